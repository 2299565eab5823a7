//! The image being written: a staging directory next to the final one,
//! sparse region files mapped shared, and an atomic commit by rename.
//! Dropped without a commit, it removes everything it wrote.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::MmapRaw;

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
}

/// An image under construction.
pub struct Staging {
    out: PathBuf,
    dir: PathBuf,
    force: bool,
    committed: bool,
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
        if out.exists() && !force {
            return Err(StagingError::Exists(out.to_path_buf()));
        }
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
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
        })
    }

    /// Create and map the sparse data file of region `index`.
    pub fn region_file(
        &self,
        index: usize,
        entry: &RegionEntry,
        page_size: u64,
    ) -> Result<RegionFile, StagingError> {
        let path = self.dir.join(image::region_file_name(index));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(write_err(&path))?;
        let len = entry.end - entry.start;
        file.set_len(len).map_err(write_err(&path))?;
        let map = if len > 0 {
            Some(MmapRaw::map_raw(&file).map_err(write_err(&path))?)
        } else {
            None
        };
        Ok(RegionFile {
            entry: entry.clone(),
            pages: len / page_size,
            map,
        })
    }

    /// Digest and sync every region, write the manifest, and rename the
    /// staging directory to the output path.
    pub fn commit(
        mut self,
        regions: &[RegionFile],
        populated: &[u64],
        pid: u32,
        comm: &str,
        page_size: u64,
    ) -> Result<(), StagingError> {
        let mut records = Vec::with_capacity(regions.len());
        for (i, r) in regions.iter().enumerate() {
            let path = self.dir.join(image::region_file_name(i));
            let digest = match &r.map {
                Some(m) => {
                    m.flush().map_err(write_err(&path))?;
                    // SAFETY: every writer thread has finished (the caller
                    // passed the final barrier), so nothing mutates the
                    // mapping while this slice lives.
                    let bytes = unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) };
                    image::digest(bytes)
                }
                None => image::digest(&[]),
            };
            records.push(RegionRecord {
                start: r.entry.start,
                end: r.entry.end,
                perms: r.entry.perms(),
                name: r.entry.name.clone(),
                file: image::region_file_name(i),
                populated_pages: populated[i],
                xxh3: image::hex_digest(digest),
            });
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

        // Replace an existing output only now, when the new one is complete.
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

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
