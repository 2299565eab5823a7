//! `procmig verify`: compare an image with a (stopped) process, byte for byte.

use serde::Serialize;

use crate::image::{Image, ImageError};
use crate::process::{process_state, read_mappings, Attachment, LeftOut, MemReader, ProcessError};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Target(#[from] ProcessError),
}

/// One page that differs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Difference {
    pub addr: u64,
    pub region: String,
    /// Why: `content` or `unmapped` (the process has no readable page there).
    pub what: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub pid: i32,
    pub regions: usize,
    pub pages_compared: u64,
    pub pages_differing: u64,
    /// The first differing pages (at most `max_listed`).
    pub first_differences: Vec<Difference>,
    /// The process was running (not stopped) when verify began: its
    /// memory has moved on since it was migrated, so differences are
    /// expected and say nothing about the image.
    pub was_running: bool,
    /// Mappings of the process that were not compared (not in the image),
    /// with the reason.
    pub not_compared: Vec<LeftOut>,
}

impl VerifyReport {
    pub fn identical(&self) -> bool {
        self.pages_differing == 0
    }

    /// What a reader should know besides the numbers, if anything.
    pub fn caveat(&self) -> Option<String> {
        (self.was_running && !self.identical()).then(|| {
            format!(
                "process {} was running when verify started, so its memory has moved on since the migration; \
                 to compare, migrate with --on-complete stop (the default) and verify the stopped process",
                self.pid
            )
        })
    }
}

/// Bytes compared per read.
const CHUNK: u64 = 1 << 20;

/// Stop `pid` (if running), compare every region of `image` with its
/// memory, and leave the process as it was.
pub fn verify_process(
    pid: i32,
    image: &Image,
    max_listed: usize,
) -> Result<VerifyReport, VerifyError> {
    // 'T' (stopped) or 't' (traced): anything else runs and changes.
    let was_running = !matches!(process_state(pid)?, 'T' | 't');
    let mut attachment = Attachment::seize(pid)?;
    attachment.stop()?;
    let mem = MemReader::open(pid)?;
    let ps = image.manifest.page_size;
    let mut report = VerifyReport {
        pid,
        regions: image.manifest.regions.len(),
        pages_compared: 0,
        pages_differing: 0,
        first_differences: Vec::new(),
        was_running,
        not_compared: not_compared(pid, image)?,
    };
    let mut buf = vec![0u8; CHUNK as usize];
    for rec in &image.manifest.regions {
        let map = image.map_region(rec)?;
        let mut off = 0u64;
        while off < rec.len() {
            let n = CHUNK.min(rec.len() - off);
            let want = &map[off as usize..(off + n) as usize];
            let got = &mut buf[..n as usize];
            let readable = mem.read(rec.start + off, got).is_ok();
            for (i, page) in want.chunks(ps as usize).enumerate() {
                let addr = rec.start + off + i as u64 * ps;
                report.pages_compared += 1;
                let what = if !readable {
                    // Retry page by page to tell unmapped pages from content.
                    let mut one = vec![0u8; ps as usize];
                    match mem.read(addr, &mut one) {
                        Ok(()) if one == page => None,
                        Ok(()) => Some("content"),
                        Err(_) => Some("unmapped"),
                    }
                } else {
                    let p = i * ps as usize;
                    (got[p..p + ps as usize] != *page).then_some("content")
                };
                if let Some(what) = what {
                    report.pages_differing += 1;
                    if report.first_differences.len() < max_listed {
                        report.first_differences.push(Difference {
                            addr,
                            region: rec.name.clone(),
                            what: what.into(),
                        });
                    }
                }
            }
            off += n;
        }
    }
    attachment.detach(crate::process::Leave::AsFound)?;
    Ok(report)
}

/// The mappings of `pid` that `image` does not hold: those procmig leaves
/// out by design, and migrated kinds the image lacks (a `--region` filter,
/// or mappings made since the migration).
fn not_compared(pid: i32, image: &Image) -> Result<Vec<LeftOut>, VerifyError> {
    let (regions, mut left) = read_mappings(pid)?;
    let held = |start: u64, end: u64| {
        image
            .manifest
            .regions
            .iter()
            .any(|r| r.start <= start && end <= r.start + r.len())
    };
    for r in regions.into_iter().filter(|r| !held(r.start, r.end)) {
        left.push(LeftOut {
            start: r.start,
            end: r.end,
            name: r.name,
            reason: "not in the image",
        });
    }
    left.sort_by_key(|l| l.start);
    Ok(left)
}
