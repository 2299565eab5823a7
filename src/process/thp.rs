//! Transparent huge pages of the source: which mappings have them, and
//! putting them back. Write-protecting and scanning memory in 4 KiB steps
//! (uffd-wp, PAGEMAP_SCAN) can split a huge page into 512 small ones, and
//! the kernel does not merge them again soon (khugepaged is slow and may be
//! off): a process that was migrated and resumed, or whose migration
//! failed, would run slower for good. So the mappings that held huge pages
//! when tracking started are collapsed again (`MADV_COLLAPSE`, Linux 6.1+,
//! applied from here with process_madvise(2)) when tracking ends.

use std::os::fd::AsRawFd;

use nix::errno::Errno;

/// `MADV_COLLAPSE` (older libc crates lack it).
const MADV_COLLAPSE: i32 = 25;

/// One mapping's address range and the huge pages it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugeMapping {
    pub start: u64,
    pub end: u64,
    /// `AnonHugePages` of the mapping, in bytes.
    pub huge_bytes: u64,
}

/// The mappings of `pid` that hold anonymous huge pages, from
/// /proc/PID/smaps. Empty if it cannot be read.
pub fn huge_mappings(pid: i32) -> Vec<HugeMapping> {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    parse_smaps(&smaps)
}

fn parse_smaps(smaps: &str) -> Vec<HugeMapping> {
    let mut out = Vec::new();
    let mut range = None;
    for line in smaps.lines() {
        if let Some(kb) = line.strip_prefix("AnonHugePages:") {
            let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            if let (Some((start, end)), true) = (range, kb > 0) {
                out.push(HugeMapping {
                    start,
                    end,
                    huge_bytes: kb << 10,
                });
            }
        } else if let Some((r, _)) = line.split_once(' ') {
            // A mapping's first line: "start-end perms offset dev inode path".
            if let Some((s, e)) = r.split_once('-') {
                if let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
                    range = Some((s, e));
                }
            }
        }
    }
    out
}

/// Collapse each range of `pid` back into huge pages where the kernel can.
/// Returns the ranges it could not collapse, with the reason (EAGAIN for a
/// page that was busy, EINVAL before Linux 6.1, EPERM without
/// CAP_SYS_NICE, ...). It works whether the process runs or is stopped.
pub fn collapse(pid: i32, ranges: &[HugeMapping]) -> Vec<(HugeMapping, Errno)> {
    if ranges.is_empty() {
        return Vec::new();
    }
    let pidfd = match super::pidfd(pid) {
        Ok(fd) => fd,
        Err(e) => return ranges.iter().map(|r| (*r, e)).collect(),
    };
    let mut failed = Vec::new();
    for r in ranges {
        let iov = libc::iovec {
            iov_base: r.start as *mut libc::c_void,
            iov_len: (r.end - r.start) as usize,
        };
        // SAFETY: the iovec describes memory of the other process; the
        // kernel only reads the iovec array itself, which lives here.
        let n = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd.as_raw_fd(),
                &iov as *const libc::iovec,
                1usize,
                MADV_COLLAPSE,
                0u32,
            )
        };
        if n < 0 {
            failed.push((*r, Errno::last()));
        }
    }
    failed
}

/// Anonymous huge pages of the whole process, in bytes.
pub fn anon_huge_bytes(pid: i32) -> u64 {
    huge_mappings(pid).iter().map(|m| m.huge_bytes).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_mappings_with_huge_pages() {
        let smaps = "\
7f0000000000-7f0004000000 rw-p 00000000 00:00 0 \n\
Size:              65536 kB\n\
AnonHugePages:     63488 kB\n\
VmFlags: rd wr mr mw me ac hg\n\
7f0004000000-7f0004001000 r--p 00000000 08:01 123    /usr/lib/x.so\n\
AnonHugePages:         0 kB\n";
        assert_eq!(
            parse_smaps(smaps),
            vec![HugeMapping {
                start: 0x7f00_0000_0000,
                end: 0x7f00_0400_0000,
                huge_bytes: 63488 << 10
            }]
        );
    }
}
