//! The image being written: a staging directory next to the final one,
//! sparse region files mapped shared, and an atomic commit by rename.
//! Dropped without a commit, it removes everything it wrote.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapRaw;

use super::hashes::PageHashes;
use crate::image::{self, Manifest, RegionRecord};
use crate::protocol::RegionEntry;

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// The output already exists and --force was not given.
    #[error("{0} already exists (use --force to replace it)")]
    Exists(PathBuf),
    /// The parent of the output path cannot be written.
    #[error("cannot write into {dir}: {source}")]
    NotWritable {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The output is a symbolic link: the image would land elsewhere, or
    /// nowhere.
    #[error("{0} is a symbolic link: name the image directory itself")]
    Symlink(PathBuf),
    /// The image would not fit.
    #[error("the image does not fit: {0}")]
    NoRoom(String),
    /// A file of the image could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One region's data file, mapped read-write and shared.
pub struct RegionFile {
    pub entry: RegionEntry,
    pub pages: u64,
    map: Option<MmapRaw>,
    file: File,
    path: PathBuf,
    /// Pages received (normal or zero) for this region.
    pub populated: AtomicU64,
    /// The hash of every page written, for the commit's digest.
    hashes: PageHashes,
}

impl RegionFile {
    /// Base pointer of the mapping (null for an empty region).
    pub fn ptr(&self) -> *mut u8 {
        self.map
            .as_ref()
            .map_or(std::ptr::null_mut(), |m| m.as_mut_ptr())
    }

    pub fn len(&self) -> u64 {
        self.entry.end - self.entry.start
    }

    /// Pages `first..` of the region were written with `bytes` (whole
    /// pages): note their hashes for the commit's digest. Every writer of
    /// the image calls it, for the pages it wrote.
    pub fn record(&self, first: u64, bytes: &[u8]) {
        self.hashes.record(first, bytes);
    }

    /// Pages `first..first+count` were written with zeros.
    pub fn forget(&self, first: u64, count: u64) {
        self.hashes.forget(first, count);
    }

    /// Make `[at, at+len)` of the mapping present and writable in one
    /// call (MADV_POPULATE_WRITE) before it is written, instead of one
    /// page fault per page: on tmpfs (/dev/shm) it cut the receiver's CPU
    /// by about a quarter (docs/benchmarks.md); on ext4 it changed
    /// nothing measurable. Best effort: a kernel without it (before 5.14)
    /// or a failure leaves the faults to the copy, as before.
    pub fn populate(&self, at: usize, len: usize) {
        debug_assert!((at + len) as u64 <= self.len());
        // SAFETY: the range lies inside our own mapping (the caller's
        // check); populating changes no byte of it.
        unsafe { libc::madvise(self.ptr().add(at).cast(), len, libc::MADV_POPULATE_WRITE) };
    }

    /// Ask the kernel to start writing the file's dirty pages back, without
    /// waiting (best effort: the commit's sync waits for all of them).
    pub fn start_writeback(&self) {
        start_writeback(&self.file)
    }

    /// Another descriptor of the region's file.
    pub fn dup(&self) -> Option<File> {
        self.file.try_clone().ok()
    }

    fn map(file: &File, len: u64) -> std::io::Result<Option<MmapRaw>> {
        if len == 0 {
            return Ok(None);
        }
        MmapRaw::map_raw(file).map(Some)
    }

    /// The region changed size at the same start: resize the file (the
    /// kept part keeps its data) and map it again.
    fn resize(&mut self, entry: &RegionEntry, page_size: u64) -> Result<(), StagingError> {
        self.map = None;
        let len = entry.end - entry.start;
        self.file.set_len(len).map_err(write_err(&self.path))?;
        self.map = Self::map(&self.file, len).map_err(write_err(&self.path))?;
        self.entry = entry.clone();
        self.pages = len / page_size;
        self.hashes.resize(self.pages);
        Ok(())
    }
}

/// Ask the kernel to start writing `file`'s dirty pages back, without
/// waiting for them (a no-op on tmpfs).
pub fn start_writeback(file: &File) {
    // SAFETY: a plain syscall on a descriptor we own; offset 0 and length 0
    // mean the whole file.
    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Free space kept back for pages queued to the workers but not yet
/// written (a few batches per worker).
const ROOM_RESERVE: u64 = 64 << 20;

/// An image under construction.
pub struct Staging {
    out: PathBuf,
    dir: PathBuf,
    force: bool,
    committed: bool,
    next_file: u64,
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> StagingError + '_ {
    move |source| StagingError::Write {
        path: path.to_path_buf(),
        source,
    }
}

impl Staging {
    /// Check that `out` can be created and create the staging directory
    /// beside it (same filesystem, so the final rename is atomic).
    pub fn create(out: &Path, force: bool) -> Result<Staging, StagingError> {
        // symlink_metadata: a dangling symlink "exists" too, and the final
        // rename would fail on it after the source handed over.
        if let Ok(m) = fs::symlink_metadata(out) {
            if !force {
                return Err(StagingError::Exists(out.to_path_buf()));
            }
            if m.file_type().is_symlink() {
                return Err(StagingError::Symlink(out.to_path_buf()));
            }
        }
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        remove_stale(&parent, &name);
        let dir = parent.join(format!(".{name}.partial-{}", std::process::id()));
        fs::create_dir(&dir).map_err(|source| StagingError::NotWritable {
            dir: parent.clone(),
            source,
        })?;
        Ok(Staging {
            out: out.to_path_buf(),
            dir,
            force,
            committed: false,
            next_file: 0,
        })
    }

    /// Create and map a sparse data file for a region. Files are renamed
    /// to their final names (by table index) at commit.
    pub fn region_file(
        &mut self,
        entry: &RegionEntry,
        page_size: u64,
    ) -> Result<RegionFile, StagingError> {
        let path = self.dir.join(format!("seg-{}.bin", self.next_file));
        self.next_file += 1;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(write_err(&path))?;
        let len = entry.end - entry.start;
        file.set_len(len).map_err(write_err(&path))?;
        let map = RegionFile::map(&file, len).map_err(write_err(&path))?;
        Ok(RegionFile {
            entry: entry.clone(),
            pages: len / page_size,
            map,
            file,
            path,
            populated: AtomicU64::new(0),
            hashes: PageHashes::new(len / page_size, page_size as usize),
        })
    }

    /// Move to a new region table: a region whose start is unchanged keeps
    /// its file (resized); others get a new, empty file; files of regions
    /// that are gone are removed.
    pub fn reconcile(
        &mut self,
        old: Vec<RegionFile>,
        table: &[RegionEntry],
        page_size: u64,
    ) -> Result<Vec<RegionFile>, StagingError> {
        let mut old: Vec<Option<RegionFile>> = old.into_iter().map(Some).collect();
        let mut out = Vec::with_capacity(table.len());
        for e in table {
            let kept = old
                .iter_mut()
                .find(|o| o.as_ref().is_some_and(|o| o.entry.start == e.start))
                .and_then(Option::take);
            out.push(match kept {
                Some(mut f) => {
                    if f.entry != *e {
                        f.resize(e, page_size)?;
                    }
                    f
                }
                None => self.region_file(e, page_size)?,
            });
        }
        for f in old.into_iter().flatten() {
            let path = f.path.clone();
            drop(f);
            fs::remove_file(&path).map_err(write_err(&path))?;
        }
        Ok(out)
    }

    /// Write a file of the image (e.g. the process state) into the staging
    /// directory; it is committed with the rest.
    pub fn add_file(&self, name: &str, bytes: &[u8]) -> Result<(), StagingError> {
        let path = self.dir.join(name);
        let f = File::create(&path).map_err(write_err(&path))?;
        use std::io::Write;
        (&f).write_all(bytes).map_err(write_err(&path))?;
        f.sync_all().map_err(write_err(&path))
    }

    /// The region's data file (for restoring straight from the staging
    /// image).
    pub fn region_data(r: &RegionFile) -> &File {
        &r.file
    }

    /// Digest and sync every region, write the manifest, and rename the
    /// staging directory to the output path.
    pub fn commit(
        &mut self,
        regions: &[RegionFile],
        pid: u32,
        comm: &str,
        page_size: u64,
    ) -> Result<(), StagingError> {
        // Start writing every region back, so that the disk works on the
        // later regions while the first are synced and digested.
        for r in regions {
            r.start_writeback();
        }
        let mut records = Vec::with_capacity(regions.len());
        for (i, r) in regions.iter().enumerate() {
            records.push(self.finish_region(i, r)?);
        }
        let manifest = Manifest {
            format: image::FORMAT_NAME.into(),
            version: image::FORMAT_VERSION,
            pid,
            comm: comm.into(),
            page_size,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            regions: records,
        };
        let path = self.dir.join(image::MANIFEST_NAME);
        let text = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        {
            let f = File::create(&path).map_err(write_err(&path))?;
            use std::io::Write;
            (&f).write_all(&text).map_err(write_err(&path))?;
            f.sync_all().map_err(write_err(&path))?;
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err(&self.dir))?;
        self.rename_into_place()
    }

    /// Give region `i` its final name, sync it, and describe it for the
    /// manifest.
    fn finish_region(&self, i: usize, r: &RegionFile) -> Result<RegionRecord, StagingError> {
        let path = self.dir.join(image::region_file_name(i));
        fs::rename(&r.path, &path).map_err(write_err(&path))?;
        if let Some(m) = &r.map {
            m.flush().map_err(write_err(&path))?;
        }
        // From the hashes taken as the pages arrived (nothing writes the
        // image any more: the workers are finished before the commit).
        let digest = r.hashes.digest();
        Ok(RegionRecord {
            start: r.entry.start,
            end: r.entry.end,
            perms: r.entry.perms(),
            name: r.entry.name.clone(),
            file: image::region_file_name(i),
            populated_pages: r.populated.load(Ordering::Relaxed),
            xxh3: image::hex_digest(digest),
        })
    }

    /// Make sure `bytes` more can be written: within `max` (the image's
    /// cap, if any, counting `written` so far) and within the free space of
    /// the filesystem, less a reserve for the pages already queued. A
    /// write into a mapped file on a full filesystem would be a SIGBUS in
    /// a worker; this turns it into an error.
    pub fn make_room(
        &self,
        written: u64,
        bytes: u64,
        max: Option<u64>,
    ) -> Result<(), StagingError> {
        if let Some(max) = max {
            if written + bytes > max {
                return Err(StagingError::NoRoom(format!(
                    "more than --max-image-size {} of pages",
                    crate::units::human_bytes(max)
                )));
            }
        }
        let free = nix::sys::statvfs::statvfs(&self.dir)
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(u64::MAX);
        if free < bytes.saturating_add(ROOM_RESERVE) {
            return Err(StagingError::NoRoom(format!(
                "{} free on the filesystem of {}",
                crate::units::human_bytes(free),
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Rename the complete staging directory to the output path, replacing
    /// an existing output (with --force) only now.
    fn rename_into_place(&mut self) -> Result<(), StagingError> {
        let old = self.out.with_file_name(format!(
            ".{}.old-{}",
            self.out
                .file_name()
                .map_or("image".into(), |n| n.to_string_lossy()),
            std::process::id()
        ));
        let replacing = self.force && self.out.exists();
        if replacing {
            fs::rename(&self.out, &old).map_err(write_err(&self.out))?;
        }
        if let Err(e) = fs::rename(&self.dir, &self.out) {
            if replacing {
                let _ = fs::rename(&old, &self.out);
            }
            return Err(write_err(&self.out)(e));
        }
        self.committed = true;
        if replacing {
            let _ = fs::remove_dir_all(&old).or_else(|_| fs::remove_file(&old));
        }
        let parent = match self.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let _ = File::open(parent).and_then(|d| d.sync_all());
        Ok(())
    }
}

/// Remove `.NAME.partial-PID` directories of receivers that died (their
/// PID is gone): what a killed receiver could not clean up itself.
fn remove_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() as i32 && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
