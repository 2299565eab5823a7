//! Dirty-page tracking: which pages of the target were written since the
//! last collection.
//!
//! Three trackers behind one trait, chosen with `--dirty-tracking`:
//!
//! - `uffd-wp`: a userfaultfd created inside the target (injected syscall),
//!   async write-protect, and one PAGEMAP_SCAN ioctl per region per round
//!   that returns the written ranges and protects them again atomically.
//! - `soft-dirty`: clear_refs "4" and bit 55 of /proc/PID/pagemap; the
//!   target is stopped for the read-and-clear so no write falls between.
//! - `compare`: a hash of every page as sent; a page is dirty when its
//!   hash changed. Works on any kernel, costs a full read per round.
//!
//! `auto` probes the kernel for real (a page written after clearing must
//! show up, the ioctls must be accepted) and never falls back silently to a
//! tracker that would report nothing. Regions a tracker cannot handle (a
//! file-backed private mapping cannot be registered with userfaultfd) are
//! tracked by comparison instead.

mod compare;
pub mod probe;
mod soft_dirty;
pub(crate) mod uffd;

use crate::process::{Attachment, ProcessError, Region};
use crate::protocol::Run;

pub use compare::CompareTracker;
pub use soft_dirty::SoftDirtyTracker;
pub use uffd::UffdTracker;

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error(transparent)]
    Target(#[from] ProcessError),
    /// The requested tracker does not work on this kernel.
    #[error("dirty tracking {method} is not available here: {reason}")]
    Unavailable { method: Tracking, reason: String },
    /// A tracking operation failed.
    #[error("{method} tracking of process {pid} failed: {what}: {source}")]
    Op {
        method: Tracking,
        pid: i32,
        what: String,
        source: std::io::Error,
    },
}

/// `--dirty-tracking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Tracking {
    /// The best this kernel offers: uffd-wp, else soft-dirty, else compare.
    Auto,
    /// The kernel's soft-dirty bits (pagemap bit 55, cleared through clear_refs).
    SoftDirty,
    /// userfaultfd write-protect in async mode, read with PAGEMAP_SCAN.
    UffdWp,
    /// Hash every page and compare with what was sent.
    Compare,
}

crate::value_enum_text!(Tracking, "dirty tracking");

/// Pages written in each region since the last collection, as page runs
/// relative to each region's start (indexes match the `regions` passed in).
#[derive(Debug, Default)]
pub struct Dirty {
    pub runs: Vec<Vec<Run>>,
    /// Regions whose tracking state was lost (e.g. remapped in place):
    /// every populated page must be sent again.
    pub refresh: Vec<usize>,
}

impl Dirty {
    pub fn pages(&self) -> u64 {
        self.runs.iter().flatten().map(|r| r.count as u64).sum()
    }
}

/// A dirty-page tracker for one target process.
pub trait DirtyTracker {
    /// The method in use.
    fn method(&self) -> Tracking;

    /// Arm tracking of `regions`; called with the target stopped, before the
    /// bulk copy reads anything.
    fn arm(&mut self, att: &mut Attachment, regions: &[Region]) -> Result<(), DirtyError>;

    /// Pages written since the last call (or `arm`), re-arming them. The
    /// region list may have changed since: regions not seen before, and the
    /// `fresh` parts of changed regions, are armed now and reported neither
    /// dirty nor refreshed (the caller sends them whole).
    /// `att` is given when the target is stopped (the final round).
    fn collect(
        &mut self,
        att: Option<&mut Attachment>,
        regions: &[Region],
        fresh: &[(usize, Run)],
    ) -> Result<Dirty, DirtyError>;

    /// The caller sent these pages of `region` with this content (pages
    /// back to back in `data`).
    fn sent(&mut self, _region: &Region, _runs: &[Run], _data: &[u8], _page_size: u64) {}

    /// Stop tracking and release everything (the target keeps running
    /// unaffected). Called on success and failure alike.
    fn finish(&mut self, att: Option<&mut Attachment>);

    /// Regions tracked by comparison because the primary method could not
    /// handle them.
    fn fallback_regions(&self) -> usize {
        0
    }
}

/// Pick and build a tracker for `pid`.
pub fn create(
    method: Tracking,
    pid: i32,
    page_size: u64,
) -> Result<Box<dyn DirtyTracker>, DirtyError> {
    let kernel = probe::probe();
    let pick = match method {
        Tracking::Auto => {
            if kernel.uffd_wp_async.is_ok() {
                Tracking::UffdWp
            } else if kernel.soft_dirty.is_ok() {
                Tracking::SoftDirty
            } else {
                Tracking::Compare
            }
        }
        m => m,
    };
    let unavailable = |reason: &Result<(), String>| DirtyError::Unavailable {
        method: pick,
        reason: reason.clone().err().unwrap_or_default(),
    };
    Ok(match pick {
        Tracking::UffdWp => {
            kernel
                .uffd_wp_async
                .as_ref()
                .map_err(|_| unavailable(&kernel.uffd_wp_async))?;
            Box::new(UffdTracker::new(pid, page_size)?)
        }
        Tracking::SoftDirty => {
            kernel
                .soft_dirty
                .as_ref()
                .map_err(|_| unavailable(&kernel.soft_dirty))?;
            Box::new(SoftDirtyTracker::new(pid, page_size)?)
        }
        Tracking::Compare | Tracking::Auto => Box::new(CompareTracker::new(pid, page_size)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_names() {
        assert_eq!("uffd-wp".parse::<Tracking>().unwrap(), Tracking::UffdWp);
        assert!("dirty".parse::<Tracking>().is_err());
    }
}
