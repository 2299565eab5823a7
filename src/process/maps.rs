//! Which mappings of the target hold its state, from /proc/PID/maps.
//!
//! Migrated: every private writable mapping (heap, stacks, anonymous
//! memory, a binary's .data/.bss) and every shared writable mapping whose
//! contents live only in memory (shared anonymous memory, memfd, SysV shm).
//! Not migrated: read-only and executable-only mappings (they match their
//! files), shared mappings of regular files (the file is the state), and
//! kernel-provided [vdso], [vvar], [vsyscall].

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

fn path_name(p: &MMapPath) -> String {
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

/// Classify one mapping; `None` if it is not migrated.
fn classify(perms: MMPermissions, path: &MMapPath) -> Option<RegionKind> {
    if !perms.contains(MMPermissions::WRITE) {
        return None;
    }
    let shared = perms.contains(MMPermissions::SHARED);
    match path {
        MMapPath::Vdso | MMapPath::Vvar | MMapPath::Vsyscall | MMapPath::Rollup => None,
        MMapPath::Heap | MMapPath::Stack | MMapPath::TStack(_) | MMapPath::Anonymous => {
            Some(if shared {
                RegionKind::Shared
            } else {
                RegionKind::PrivateAnon
            })
        }
        MMapPath::Vsys(_) => Some(RegionKind::Shared),
        MMapPath::Other(name) => {
            // [anon:name] (prctl PR_SET_VMA_ANON_NAME) and [anon_shmem:name].
            if name.starts_with("anon_shmem") {
                Some(RegionKind::Shared)
            } else if name.starts_with("anon") && !shared {
                Some(RegionKind::PrivateAnon)
            } else {
                None
            }
        }
        MMapPath::Path(p) => {
            let p = p.to_string_lossy();
            if !shared {
                Some(RegionKind::PrivateFile)
            } else if p.starts_with("/dev/zero")
                || p.starts_with("/memfd:")
                || p.starts_with("/SYSV")
            {
                Some(RegionKind::Shared)
            } else {
                None
            }
        }
    }
}

/// Read /proc/PID/maps and return the migrated regions, in address order.
pub fn read_regions(pid: i32) -> Result<Vec<Region>, ProcessError> {
    let maps_err = |reason: String| ProcessError::Maps { pid, reason };
    let proc = Process::new(pid).map_err(|_| ProcessError::NoSuchProcess { pid })?;
    let maps = proc.maps().map_err(|e| maps_err(e.to_string()))?;
    let mut out = Vec::new();
    for m in maps {
        let Some(kind) = classify(m.perms, &m.pathname) else {
            continue;
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
            start: m.address.0,
            end: m.address.1,
            prot,
            name: path_name(&m.pathname),
            kind,
        });
    }
    Ok(out)
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
