//! Which mappings of the target hold its state, from /proc/PID/maps.
//!
//! Migrated: every private writable mapping (heap, stacks, anonymous
//! memory, a binary's .data/.bss) and every shared writable mapping whose
//! contents live only in memory (shared anonymous memory, /dev/zero,
//! memfd, SysV shm, and files on memory-only filesystems: /dev/shm and
//! other tmpfs, ramfs, hugetlbfs).
//! Not migrated, and listed with the reason ([`LeftOut`]): read-only and
//! executable-only mappings (they match their files), shared mappings of
//! files on disk (the file is the state), and kernel-provided [vdso],
//! [vvar], [vsyscall].

use std::fmt;
use std::str::FromStr;

use procfs::process::{MMPermissions, MMapPath, Process};

use super::ProcessError;
use crate::protocol::{PROT_R, PROT_SHARED, PROT_W, PROT_X};

/// What backs a region; decides whether absent pages may be skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Private anonymous memory: a page not in the page tables is zero, so
    /// pagemap tells which pages need sending.
    PrivateAnon,
    /// Private file mapping: absent pages still read the file's contents.
    PrivateFile,
    /// Shared memory: pages may be populated in the shared object without
    /// being mapped in this process.
    Shared,
}

/// One migrated mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits of the protocol.
    pub prot: u32,
    pub name: String,
    pub kind: RegionKind,
}

impl Region {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// `--region`: an address range `START-END` (hex, as in /proc/PID/maps) or
/// a mapping name (`[heap]`, `[stack]`, a path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionFilter {
    Range(u64, u64),
    Name(String),
}

impl FromStr for RegionFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some((a, b)) = s.split_once('-') {
            let hex = |t: &str| u64::from_str_radix(t.trim_start_matches("0x"), 16);
            if let (Ok(a), Ok(b)) = (hex(a), hex(b)) {
                if a >= b {
                    return Err(format!("empty address range {s:?}"));
                }
                return Ok(RegionFilter::Range(a, b));
            }
        }
        if s.is_empty() {
            return Err("empty --region".into());
        }
        Ok(RegionFilter::Name(s.to_string()))
    }
}

impl fmt::Display for RegionFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionFilter::Range(a, b) => write!(f, "{a:x}-{b:x}"),
            RegionFilter::Name(n) => f.write_str(n),
        }
    }
}

/// The name /proc/PID/maps shows for a mapping.
pub(crate) fn path_name(p: &MMapPath) -> String {
    match p {
        MMapPath::Path(p) => p.to_string_lossy().into_owned(),
        MMapPath::Heap => "[heap]".into(),
        MMapPath::Stack => "[stack]".into(),
        MMapPath::TStack(t) => format!("[stack:{t}]"),
        MMapPath::Vdso => "[vdso]".into(),
        MMapPath::Vvar => "[vvar]".into(),
        MMapPath::Vsyscall => "[vsyscall]".into(),
        MMapPath::Rollup => "[rollup]".into(),
        MMapPath::Anonymous => String::new(),
        MMapPath::Vsys(key) => format!("/SYSV{key:08x}"),
        MMapPath::Other(s) => format!("[{s}]"),
    }
}

/// A mapping that is not migrated, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeftOut {
    pub start: u64,
    pub end: u64,
    pub name: String,
    pub reason: &'static str,
}

/// Why mappings are left out (the texts reports show).
pub mod reason {
    pub const READ_ONLY: &str = "not writable: its contents match its file or the kernel's";
    pub const KERNEL: &str = "provided by the kernel ([vdso], [vvar], [vsyscall], ...)";
    pub const SHARED_DISK_FILE: &str = "shared mapping of a file on disk: the file holds its data";
    pub const SHARED_OTHER: &str = "shared mapping of a kind procmig does not migrate";
}

/// Filesystems whose files live only in memory (statfs f_type).
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Whether the file mapped at `start-end` of `pid` lives only in memory
/// (tmpfs, /dev/shm, ramfs, hugetlbfs). Asked through
/// /proc/PID/map_files, which reaches the file even when it was unlinked,
/// then through its path.
fn memory_only_file(pid: i32, start: u64, end: u64, path: &std::path::Path) -> bool {
    // f_type is i64 here, narrower on some architectures.
    #[allow(clippy::unnecessary_cast)]
    let magic = |p: &std::path::Path| {
        nix::sys::statfs::statfs(p)
            .ok()
            .map(|s| s.filesystem_type().0 as i64)
    };
    let via_map = std::path::PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
    let plain = std::path::PathBuf::from(path.to_string_lossy().trim_end_matches(" (deleted)"));
    magic(&via_map)
        .or_else(|| magic(&plain))
        .is_some_and(|m| matches!(m, TMPFS_MAGIC | RAMFS_MAGIC | HUGETLBFS_MAGIC))
}

/// Classify one mapping: how it is migrated, or why it is not.
/// `memory_only` tells, for a shared file mapping, whether its file lives
/// only in memory (asked only then).
fn classify(
    perms: MMPermissions,
    path: &MMapPath,
    memory_only: impl FnOnce() -> bool,
) -> Result<RegionKind, &'static str> {
    if matches!(
        path,
        MMapPath::Vdso | MMapPath::Vvar | MMapPath::Vsyscall | MMapPath::Rollup
    ) {
        return Err(reason::KERNEL);
    }
    if !perms.contains(MMPermissions::WRITE) {
        return Err(reason::READ_ONLY);
    }
    let shared = perms.contains(MMPermissions::SHARED);
    match path {
        MMapPath::Heap | MMapPath::Stack | MMapPath::TStack(_) | MMapPath::Anonymous => {
            Ok(if shared {
                RegionKind::Shared
            } else {
                RegionKind::PrivateAnon
            })
        }
        MMapPath::Vsys(_) => Ok(RegionKind::Shared),
        MMapPath::Other(name) => {
            // [anon:name] (prctl PR_SET_VMA_ANON_NAME) and [anon_shmem:name].
            if name.starts_with("anon_shmem") {
                Ok(RegionKind::Shared)
            } else if name.starts_with("anon") && !shared {
                Ok(RegionKind::PrivateAnon)
            } else if shared {
                Err(reason::SHARED_OTHER)
            } else {
                Err(reason::KERNEL)
            }
        }
        MMapPath::Path(p) => {
            let p = p.to_string_lossy();
            if !shared {
                Ok(RegionKind::PrivateFile)
            } else if p.starts_with("/dev/zero")
                || p.starts_with("/memfd:")
                || p.starts_with("/SYSV")
                || memory_only()
            {
                // memfd, SysV shm, /dev/shm and other tmpfs files, shared
                // hugetlb memory: their pages exist only in memory.
                Ok(RegionKind::Shared)
            } else {
                Err(reason::SHARED_DISK_FILE)
            }
        }
        _ => unreachable!("kernel mappings returned above"),
    }
}

/// Read /proc/PID/maps and return the migrated regions, in address order.
pub fn read_regions(pid: i32) -> Result<Vec<Region>, ProcessError> {
    Ok(read_mappings(pid)?.0)
}

/// Every mapping of `pid`: the migrated regions, and those left out with
/// the reason.
pub fn read_mappings(pid: i32) -> Result<(Vec<Region>, Vec<LeftOut>), ProcessError> {
    let maps_err = |reason: String| ProcessError::Maps { pid, reason };
    let proc = Process::new(pid).map_err(|_| ProcessError::NoSuchProcess { pid })?;
    let maps = proc.maps().map_err(|e| maps_err(e.to_string()))?;
    let mut out = Vec::new();
    let mut left = Vec::new();
    for m in maps {
        let (start, end) = m.address;
        let memory_only = || match &m.pathname {
            MMapPath::Path(p) => memory_only_file(pid, start, end, p),
            _ => false,
        };
        let kind = match classify(m.perms, &m.pathname, memory_only) {
            Ok(k) => k,
            Err(reason) => {
                left.push(LeftOut {
                    start,
                    end,
                    name: path_name(&m.pathname),
                    reason,
                });
                continue;
            }
        };
        let mut prot = 0;
        for (flag, bit) in [
            (MMPermissions::READ, PROT_R),
            (MMPermissions::WRITE, PROT_W),
            (MMPermissions::EXECUTE, PROT_X),
            (MMPermissions::SHARED, PROT_SHARED),
        ] {
            if m.perms.contains(flag) {
                prot |= bit;
            }
        }
        out.push(Region {
            start,
            end,
            prot,
            name: path_name(&m.pathname),
            kind,
        });
    }
    Ok((out, left))
}

/// Left-out mappings by reason, for a one-line summary per reason: (reason,
/// count, the first few names).
pub fn summarize(left: &[LeftOut]) -> Vec<(&'static str, usize, Vec<String>)> {
    let mut out: Vec<(&'static str, usize, Vec<String>)> = Vec::new();
    for l in left {
        let i = match out.iter().position(|(r, _, _)| *r == l.reason) {
            Some(i) => i,
            None => {
                out.push((l.reason, 0, Vec::new()));
                out.len() - 1
            }
        };
        out[i].1 += 1;
        let shown = if l.name.is_empty() {
            format!("{:#x}-{:#x}", l.start, l.end)
        } else {
            l.name.clone()
        };
        if out[i].2.len() < 3 && !out[i].2.contains(&shown) {
            out[i].2.push(shown);
        }
    }
    out
}

/// Keep the regions that match any filter (all when `filters` is empty).
/// Range filters clip regions to the range. Every filter must match.
pub fn select_regions(
    pid: i32,
    regions: Vec<Region>,
    filters: &[RegionFilter],
    page_size: u64,
) -> Result<Vec<Region>, ProcessError> {
    if filters.is_empty() {
        return Ok(regions);
    }
    let mut matched = vec![false; filters.len()];
    let mut out = Vec::new();
    for r in regions {
        let mut clip: Option<(u64, u64)> = None;
        for (i, f) in filters.iter().enumerate() {
            let hit = match f {
                RegionFilter::Name(n) => (*n == r.name).then_some((r.start, r.end)),
                RegionFilter::Range(a, b) => {
                    let s = (*a).max(r.start) / page_size * page_size;
                    let e = (*b).min(r.end).div_ceil(page_size) * page_size;
                    (s < e).then_some((s, e.min(r.end)))
                }
            };
            if let Some((s, e)) = hit {
                matched[i] = true;
                clip = Some(match clip {
                    None => (s, e),
                    Some((cs, ce)) => (cs.min(s), ce.max(e)),
                });
            }
        }
        if let Some((s, e)) = clip {
            out.push(Region {
                start: s,
                end: e,
                ..r
            });
        }
    }
    if let Some(i) = matched.iter().position(|m| !m) {
        return Err(ProcessError::NoMatch {
            pid,
            filter: filters[i].to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(start: u64, end: u64, name: &str) -> Region {
        Region {
            start,
            end,
            prot: PROT_R | PROT_W,
            name: name.into(),
            kind: RegionKind::PrivateAnon,
        }
    }

    #[test]
    fn filters_parse() {
        assert_eq!(
            "7f00-7f80".parse::<RegionFilter>().unwrap(),
            RegionFilter::Range(0x7f00, 0x7f80)
        );
        assert_eq!(
            "[heap]".parse::<RegionFilter>().unwrap(),
            RegionFilter::Name("[heap]".into())
        );
        assert!("20-10".parse::<RegionFilter>().is_err());
    }

    #[test]
    fn select_by_range_and_name() {
        let regions = vec![
            region(0x1000, 0x5000, "[heap]"),
            region(0x8000, 0x10000, ""),
        ];
        let got = select_regions(
            1,
            regions.clone(),
            &[RegionFilter::Range(0x9100, 0xa000)],
            0x1000,
        )
        .unwrap();
        assert_eq!((got[0].start, got[0].end), (0x9000, 0xa000));
        let got = select_regions(1, regions.clone(), &["[heap]".parse().unwrap()], 0x1000).unwrap();
        assert_eq!(got, vec![regions[0].clone()]);
        assert!(select_regions(1, regions, &["[stack]".parse().unwrap()], 0x1000).is_err());
    }

    #[test]
    fn own_regions_are_classified() {
        let me = std::process::id() as i32;
        let regions = read_regions(me).unwrap();
        assert!(regions.iter().any(|r| r.name == "[stack]"));
        assert!(regions.iter().all(|r| r.prot & PROT_W != 0));
        assert!(!regions
            .iter()
            .any(|r| r.name == "[vdso]" || r.name == "[vvar]"));
    }
}
