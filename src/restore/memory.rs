//! Restore, memory: every mapping recreated at its address and filled
//! from the image (post-copy: the missing pages left out and a
//! userfaultfd registered for them).

use super::build::{Builder, Memory};
use super::state::*;
use crate::image::data_extent;

impl Builder<'_> {
    pub(super) fn mappings(&mut self, mem: &Memory) -> Result<(), String> {
        let st = self.st;
        for m in &st.mappings {
            if self.is_kept(m) {
                // The shell's mapping, filled during pre-copy.
                let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
                if m.prot() as u64 != rw {
                    self.call(
                        libc::SYS_mprotect,
                        [m.start, m.len(), m.prot() as u64, 0, 0, 0],
                        &format!("mprotect {:#x}-{:#x}", m.start, m.end),
                    )?;
                }
                continue;
            }
            let flags_shared = if m.shared() {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
            let prot = m.prot() as u64;
            match &m.backing {
                Backing::Kernel | Backing::Vsyscall => continue,
                Backing::Anon | Backing::SharedMemory => {
                    let mut flags = flags_shared | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
                    if m.name == "[stack]" {
                        flags |= libc::MAP_GROWSDOWN;
                    }
                    self.call(
                        libc::SYS_mmap,
                        [m.start, m.len(), prot, flags as u64, u64::MAX, 0],
                        &format!("mapping {:#x}-{:#x}", m.start, m.end),
                    )?;
                }
                Backing::File(r) => {
                    let writable_shared = m.shared() && m.prot() & libc::PROT_WRITE != 0;
                    let oflags = if writable_shared {
                        libc::O_RDWR
                    } else {
                        libc::O_RDONLY
                    };
                    let path = self.put_str(&r.path, 0)?;
                    let fd = self.call(
                        libc::SYS_openat,
                        [libc::AT_FDCWD as u64, path, oflags as u64, 0, 0, 0],
                        &format!("opening {}", r.path),
                    )? as u64;
                    let flags = (flags_shared | libc::MAP_FIXED) as u64;
                    let res = self.call(
                        libc::SYS_mmap,
                        [m.start, m.len(), prot, flags, fd, m.offset],
                        &format!("mapping {} at {:#x}", r.path, m.start),
                    );
                    self.call(libc::SYS_close, [fd, 0, 0, 0, 0, 0], "close")?;
                    res?;
                }
            }
            if m.migrated {
                let t = std::time::Instant::now();
                self.fill(m, mem)?;
                self.copy_time += t.elapsed();
            }
        }
        let t = std::time::Instant::now();
        for p in &st.extra_pages {
            self.c.write(p.addr, &p.data)?;
        }
        self.copy_time += t.elapsed();
        Ok(())
    }

    /// A shell built during pre-copy holds `filled` (the image's data for
    /// those ranges): keep the private anonymous mappings it covers, and
    /// unmap the rest of it (what the process no longer maps, or maps
    /// otherwise).
    pub(super) fn keep_filled(&mut self, filled: &[(u64, u64)]) -> Result<(), String> {
        let filled = merged(filled);
        let inside = |m: &Mapping| {
            let i = filled.partition_point(|&(_, e)| e <= m.start);
            filled
                .get(i)
                .is_some_and(|&(s, e)| s <= m.start && m.end <= e)
        };
        self.kept = self
            .st
            .mappings
            .iter()
            .filter(|m| {
                m.migrated
                    && m.backing == Backing::Anon
                    && !m.shared()
                    && m.name != "[stack]"
                    && inside(m)
            })
            .map(|m| (m.start, m.end))
            .collect();
        self.kept.sort_unstable();
        for (s, e) in subtract(&filled, &self.kept) {
            self.call(libc::SYS_munmap, [s, e - s, 0, 0, 0, 0], "munmap")?;
        }
        Ok(())
    }

    fn is_kept(&self, m: &Mapping) -> bool {
        self.kept.binary_search(&(m.start, m.end)).is_ok()
    }

    /// Post-copy with a shell: the pages the process gets by post-copy
    /// were filled with older data; drop them (they are missing again, and
    /// fault), less those dropped already during pre-copy.
    pub(super) fn drop_missing_kept(&mut self, dropped: &[(u64, u64)]) -> Result<(), String> {
        let ranges = subtract(
            &intersect(&self.skip, &merged(&self.kept)),
            &merged(dropped),
        );
        let (scratch, len) = (self.scratch, super::build::SCRATCH_LEN);
        self.c
            .dont_need(scratch, len, &ranges)
            .map_err(|e| format!("dropping the pages post-copy brings: {e}"))
    }

    /// Post-copy (the missing pages were not filled): create a
    /// userfaultfd in the process, take it here, and register every
    /// migrated private anonymous mapping for missing pages. The uffd is
    /// made inside the process (injected) so that it belongs to its memory;
    /// procmig holds the only descriptor.
    pub(super) fn userfaultfd(&mut self) -> Result<std::os::fd::OwnedFd, String> {
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let fd = self.call(libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0], "userfaultfd")?;
        let ours = crate::process::take_remote_fd(self.c.pid, fd as i32);
        self.call(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0], "close")?;
        let ours = ours.map_err(|e| e.to_string())?;
        use std::os::fd::AsRawFd;
        let raw = ours.as_raw_fd();
        crate::userfault::enable_missing(raw).map_err(|e| format!("userfaultfd: {e}"))?;
        for m in &self.st.mappings {
            if m.migrated && m.backing == Backing::Anon && !m.shared() {
                crate::userfault::register_missing(raw, m.start, m.len()).map_err(|e| {
                    format!(
                        "registering {:#x}-{:#x} for missing pages: {e}",
                        m.start, m.end
                    )
                })?;
            }
        }
        Ok(ours)
    }

    /// Copy a migrated mapping's contents from the image. Anonymous memory
    /// starts zero, so only data extents are copied; a private file
    /// mapping is copied whole (its zero pages are holes in the image but
    /// file data in the fresh mapping).
    pub(super) fn fill(&mut self, m: &Mapping, mem: &Memory) -> Result<(), String> {
        let Some(&(rs, re, file)) = mem
            .regions
            .iter()
            .find(|(s, e, _)| *s <= m.start && m.end <= *e)
        else {
            return Err(format!(
                "the image has no data for {:#x}-{:#x} {}",
                m.start, m.end, m.name
            ));
        };
        let base = m.start - rs;
        let end = base + m.len();
        if re - rs > 0 && file.metadata().map_or(0, |md| md.len()) < end {
            return Err(format!("the image's data for {} is short", m.name));
        }
        // SAFETY: the image file is not changed while it is restored from;
        // the mapping is only read.
        let map =
            unsafe { memmap2::Mmap::map(file) }.map_err(|e| format!("mapping the image: {e}"))?;
        let whole = matches!(m.backing, Backing::File(_)) && !m.shared();
        if whole {
            return self.copy_run(rs + base, &map[base as usize..end as usize]);
        }
        // Pages in the page cache were written (the receiver just wrote
        // them, or they were read before): copy them without asking the
        // filesystem, whose SEEK_DATA is slow on freshly written
        // (delayed-allocation) files. Elsewhere, only its data extents.
        let ps = 4096u64;
        let resident = resident_pages(&map[base as usize..end as usize]);
        let mut p = 0usize;
        while p < resident.len() {
            let r = resident[p];
            let q = (p..resident.len())
                .find(|&i| resident[i] != r)
                .unwrap_or(resident.len());
            let (s0, e0) = (base + p as u64 * ps, (base + q as u64 * ps).min(end));
            if r {
                self.copy_run(rs + s0, &map[s0 as usize..e0 as usize])?;
            } else {
                let mut off = s0;
                while off < e0 {
                    match data_extent(file, off, e0)
                        .map_err(|e| format!("reading the image: {e}"))?
                    {
                        Some((s, e)) => {
                            let (s, e) = (s.max(off), e.min(e0));
                            if s < e {
                                self.copy_run(rs + s, &map[s as usize..e as usize])?;
                            }
                            off = e.max(off + 1);
                        }
                        None => break,
                    }
                }
            }
            p = q;
        }
        Ok(())
    }

    /// Copy a run: both sides populated in one go first (one call instead
    /// of a fault per page), then copied.
    pub(super) fn copy_run(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String> {
        // Post-copy: leave the missing pages out.
        let end = addr + bytes.len() as u64;
        let first = self.skip.partition_point(|&(_, e)| e <= addr);
        if self.skip.get(first).is_some_and(|&(s, _)| s < end) {
            let mut at = addr;
            let holes: Vec<(u64, u64)> = self.skip[first..]
                .iter()
                .take_while(|&&(s, _)| s < end)
                .copied()
                .collect();
            for (s, e) in holes {
                if s > at {
                    let (a, b) = ((at - addr) as usize, (s - addr) as usize);
                    self.copy_unskipped(at, &bytes[a..b])?;
                }
                at = at.max(e);
            }
            if at < end {
                self.copy_unskipped(at, &bytes[(at - addr) as usize..])?;
            }
            return Ok(());
        }
        self.copy_unskipped(addr, bytes)
    }

    pub(super) fn copy_unskipped(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String> {
        const MADV_POPULATE_READ: i32 = 22;
        const MADV_POPULATE_WRITE: u64 = 23;
        if bytes.len() >= 64 << 12 {
            let pid = self.c.pid;
            let _ = self.c.call_raw(
                pid,
                libc::SYS_madvise,
                [addr, bytes.len() as u64, MADV_POPULATE_WRITE, 0, 0, 0],
            );
            let start = bytes.as_ptr() as usize & !4095;
            let len = bytes.as_ptr() as usize + bytes.len() - start;
            // SAFETY: advice over our own read-only mapping of the image.
            unsafe { libc::madvise(start as *mut libc::c_void, len, MADV_POPULATE_READ) };
        }
        self.copy_in(addr, bytes)
    }

    /// Copy `bytes` to `addr` in the child: process_vm_writev (one copy,
    /// the mapping is writable), else through /proc/PID/mem.
    pub(super) fn copy_in(&self, addr: u64, bytes: &[u8]) -> Result<(), String> {
        use nix::sys::uio::{process_vm_writev, RemoteIoVec};
        const CHUNK: usize = 64 << 20;
        let pid = nix::unistd::Pid::from_raw(self.c.pid);
        for (i, part) in bytes.chunks(CHUNK).enumerate() {
            let at = addr + (i * CHUNK) as u64;
            let remote = [RemoteIoVec {
                base: at as usize,
                len: part.len(),
            }];
            match process_vm_writev(pid, &[std::io::IoSlice::new(part)], &remote) {
                Ok(n) if n == part.len() => {}
                _ => self.c.write(at, part)?,
            }
        }
        Ok(())
    }
}

/// Ranges sorted and merged.
pub(super) fn merged(r: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v = r.to_vec();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(l) if s <= l.1 => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Which pages of a file mapping are in the page cache (mincore).
pub(super) fn resident_pages(map: &[u8]) -> Vec<bool> {
    let pages = map.len().div_ceil(4096);
    let mut v = vec![0u8; pages];
    let start = map.as_ptr() as usize & !4095;
    let len = map.as_ptr() as usize + map.len() - start;
    // SAFETY: mincore writes one byte per page of the range into `v`.
    let r = unsafe { libc::mincore(start as *mut libc::c_void, len, v.as_mut_ptr()) };
    if r < 0 {
        return vec![false; pages];
    }
    v.iter().map(|b| b & 1 != 0).collect()
}

/// `a` less `b` (both sorted and disjoint).
pub(super) fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in a {
        let mut at = s;
        let first = b.partition_point(|&(_, be)| be <= s);
        for &(bs, be) in b[first..].iter().take_while(|&&(bs, _)| bs < e) {
            if bs > at {
                out.push((at, bs));
            }
            at = at.max(be);
        }
        if at < e {
            out.push((at, e));
        }
    }
    out
}

/// Where `a` and `b` overlap (both sorted and disjoint).
pub(super) fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_arithmetic() {
        let a = [(0, 10), (20, 30)];
        let b = [(2, 4), (8, 22), (29, 40)];
        assert_eq!(subtract(&a, &b), vec![(0, 2), (4, 8), (22, 29)]);
        assert_eq!(intersect(&a, &b), vec![(2, 4), (8, 10), (20, 22), (29, 30)]);
        assert_eq!(subtract(&a, &[]), a.to_vec());
        assert!(intersect(&a, &[]).is_empty());
        assert_eq!(subtract(&[(0, 10)], &[(0, 10)]), vec![]);
    }
}
