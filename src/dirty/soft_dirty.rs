//! Soft-dirty tracking: clear with "4" to /proc/PID/clear_refs, read bit 55
//! of /proc/PID/pagemap. Reading and clearing are two steps, so the target
//! is stopped (briefly, all threads) around them: a write between the read
//! and the clear would otherwise be lost.

use std::fs::{File, OpenOptions};
use std::io::Write;

use super::{Dirty, DirtyError, DirtyTracker, Tracking};
use crate::process::{Attachment, Leave, Pagemap, Region, RegionKind, PM_PRESENT, PM_SWAPPED};
use crate::protocol::Run;

/// pagemap bit 55: page written since the last clear.
pub const PM_SOFT_DIRTY: u64 = 1 << 55;

const CHUNK: usize = 512;

pub struct SoftDirtyTracker {
    pid: i32,
    page_size: u64,
    pagemap: Pagemap,
    clear_refs: File,
    entries: Vec<u64>,
}

impl SoftDirtyTracker {
    pub fn new(pid: i32, page_size: u64) -> Result<SoftDirtyTracker, DirtyError> {
        let clear_refs = OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/clear_refs"))
            .map_err(|source| DirtyError::Op {
                method: Tracking::SoftDirty,
                pid,
                what: "open clear_refs".into(),
                source,
            })?;
        Ok(SoftDirtyTracker {
            pid,
            page_size,
            pagemap: Pagemap::open(pid, page_size)?,
            clear_refs,
            entries: vec![0; CHUNK],
        })
    }

    fn clear(&mut self) -> Result<(), DirtyError> {
        self.clear_refs
            .write_all(b"4")
            .map_err(|source| DirtyError::Op {
                method: Tracking::SoftDirty,
                pid: self.pid,
                what: "clear soft-dirty bits".into(),
                source,
            })
    }

    fn read_and_clear(&mut self, regions: &[Region]) -> Result<Dirty, DirtyError> {
        let ps = self.page_size;
        let mut dirty = Dirty {
            runs: vec![Vec::new(); regions.len()],
            refresh: Vec::new(),
        };
        for (i, r) in regions.iter().enumerate() {
            let pages = r.len() / ps;
            let mut page = 0;
            while page < pages {
                let n = (pages - page).min(CHUNK as u64) as usize;
                self.pagemap
                    .read(r.start + page * ps, &mut self.entries[..n])?;
                for (j, e) in self.entries[..n].iter().enumerate() {
                    // New mappings report every page soft-dirty, populated
                    // or not; an absent anonymous page is zero and was
                    // either never sent or is caught as a discard.
                    let holds =
                        r.kind != RegionKind::PrivateAnon || e & (PM_PRESENT | PM_SWAPPED) != 0;
                    if e & PM_SOFT_DIRTY != 0 && holds {
                        crate::pages::push_run(&mut dirty.runs[i], page + j as u64, 1);
                    }
                }
                page += n as u64;
            }
        }
        self.clear()?;
        Ok(dirty)
    }
}

impl DirtyTracker for SoftDirtyTracker {
    fn method(&self) -> Tracking {
        Tracking::SoftDirty
    }

    fn arm(&mut self, _att: &mut Attachment, _regions: &[Region]) -> Result<(), DirtyError> {
        self.clear()
    }

    fn collect(
        &mut self,
        att: Option<&mut Attachment>,
        regions: &[Region],
        _fresh: &[(usize, Run)],
    ) -> Result<Dirty, DirtyError> {
        if att.is_some() {
            return self.read_and_clear(regions);
        }
        let mut stop = Attachment::seize(self.pid)?;
        stop.stop()?;
        let d = self.read_and_clear(regions);
        stop.detach(Leave::AsFound)?;
        d
    }

    fn finish(&mut self, _att: Option<&mut Attachment>) {}
}
