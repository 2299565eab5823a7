//! Rebuilding a process from its state and memory, in a [`Child`]:
//!
//! 1. a code page at an address free in both the old layout and the child;
//! 2. the child's own rseq, fds and mappings dropped; the kernel's vDSO and
//!    vvar pages moved to where the process had them;
//! 3. every mapping recreated at its address (files checked by identity)
//!    and filled: migrated regions from the image, the few private pages of
//!    other mappings from the state;
//! 4. the mm fields and exe link (PR_SET_MM_MAP), descriptors at their
//!    numbers, signal handlers, cwd, umask, limits;
//! 5. threads cloned, each given its tid address, robust list, rseq,
//!    alternate stack and name, then its registers, FP state and mask;
//! 6. credentials, the code page unmapped.
//!
//! The result is stopped; [`Restored::start`] lets it run.

use std::fs::File;
use std::os::fd::AsRawFd;

use super::child::Child;
use super::state::*;
use crate::image::data_extent;

/// Pages of the code page: one of code, the rest scratch for arguments.
const CODE_PAGES: u64 = 4;
const SCRATCH_LEN: usize = 3 * 4096;

/// The migrated memory: region address ranges and their data files.
pub struct Memory<'a> {
    pub regions: Vec<(u64, u64, &'a File)>,
}

/// Choices of the destination.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Opened for fds 0-2 that led out of the process (terminal, pipe,
    /// socket) on the source.
    pub stdio: std::path::PathBuf,
    /// Keep the process's pid and thread ids (clone3 set_tid): they must
    /// be free here. Otherwise the process gets new ones.
    pub same_pid: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            stdio: "/dev/null".into(),
            same_pid: false,
        }
    }
}

/// A process rebuilt and stopped, not yet running.
pub struct Restored {
    child: Child,
    pub notes: Vec<String>,
    /// Time spent copying memory into it (the rest of a restore is fixed
    /// cost).
    pub copy_time: std::time::Duration,
    /// Post-copy: a userfaultfd of the process, its private anonymous
    /// memory registered for missing pages (the missing ones dropped).
    pub uffd: Option<std::os::fd::OwnedFd>,
}

impl Restored {
    pub fn pid(&self) -> i32 {
        self.child.pid
    }

    /// Let it run. Returns its pid.
    pub fn start(self) -> Result<i32, String> {
        self.child.release()
    }
}

struct Builder<'a> {
    c: Child,
    st: &'a ProcessState,
    code: u64,
    scratch: u64,
    notes: Vec<String>,
    copy_time: std::time::Duration,
    /// Post-copy: address ranges not to fill (sorted, disjoint).
    skip: Vec<(u64, u64)>,
    /// Descriptors are parked at or above this (past every number the
    /// process uses) before they are moved to their numbers.
    park_at: u64,
}

/// Rebuild the process `st` describes, with `mem` holding its migrated
/// memory. It is left stopped. With `missing` (post-copy), those address
/// ranges are left unpopulated and a userfaultfd is made for them.
pub fn restore(
    st: &ProcessState,
    mem: &Memory,
    opts: &RestoreOptions,
    missing: Option<&[(u64, u64)]>,
) -> Result<Restored, String> {
    check_files(st)?;
    let mut c = Child::spawn(opts.same_pid.then_some(st.pid))
        .map_err(|e| format!("creating process {}: {e}", st.pid))?;
    let code = free_range(st, c.pid, CODE_PAGES * 4096)?;
    c.map_code(code, CODE_PAGES * 4096)
        .map_err(|e| format!("preparing the new process: {e}"))?;
    let mut b = Builder {
        c,
        st,
        code,
        scratch: code + 4096,
        notes: Vec::new(),
        copy_time: std::time::Duration::ZERO,
        skip: missing.map(merged).unwrap_or_default(),
        park_at: st
            .fds
            .iter()
            .map(|f| f.fd as u64 + 1)
            .max()
            .unwrap_or(0)
            .max(3),
    };
    b.clean()?;
    b.kernel_mappings()?;
    b.mappings(mem)?;
    let uffd = match missing {
        Some(_) => Some(b.userfaultfd()?),
        None => None,
    };
    b.mm()?;
    b.fds(opts)?;
    b.process_wide()?;
    b.threads(opts.same_pid)?;
    b.finish()?;
    Ok(Restored {
        child: b.c,
        notes: b.notes,
        copy_time: b.copy_time,
        uffd,
    })
}

/// Every file the process maps (and its executable) must be the same file
/// here: same size and modification time, and on the same boot of the
/// same machine the same device and inode.
fn check_files(st: &ProcessState) -> Result<(), String> {
    let same_boot = st.boot_id == super::capture::boot_id();
    let check = |r: &FileRef| -> Result<(), String> {
        let here = super::capture::file_ref(&r.path)
            .map_err(|e| format!("{}: needed by the process, but {e}", r.path))?;
        if here.size != r.size || here.mtime_ns != r.mtime_ns {
            return Err(format!(
                "{} differs from the source's (size {} vs {}, or modified since): the process would run other code or data",
                r.path, here.size, r.size
            ));
        }
        if same_boot && (here.dev != r.dev || here.ino != r.ino) {
            return Err(format!("{} is another file than the source's", r.path));
        }
        Ok(())
    };
    check(&st.exe)?;
    for m in &st.mappings {
        if let Backing::File(r) = &m.backing {
            if !m.migrated || !m.shared() {
                check(r)?;
            }
        }
    }
    Ok(())
}

/// The child's mappings: (start, end, name).
fn child_maps(pid: i32) -> Result<Vec<(u64, u64, String)>, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("maps of the new process: {e}"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let range = w.next().unwrap_or("");
        let name = w.nth(4).unwrap_or("").to_string();
        if let Some((a, b)) = range.split_once('-') {
            let a = u64::from_str_radix(a, 16).unwrap_or(0);
            let b = u64::from_str_radix(b, 16).unwrap_or(0);
            out.push((a, b, name));
        }
    }
    Ok(out)
}

/// A free range of `len` bytes in both the old layout and the child.
fn free_range(st: &ProcessState, pid: i32, len: u64) -> Result<u64, String> {
    let mut used: Vec<(u64, u64)> = st.mappings.iter().map(|m| (m.start, m.end)).collect();
    used.extend(child_maps(pid)?.into_iter().map(|(a, b, _)| (a, b)));
    used.sort_unstable();
    // Search downwards from below the usual mmap area, away from both.
    let mut at: u64 = 0x7e00_0000_0000;
    'search: while at > 0x1_0000_0000 {
        for &(a, b) in &used {
            if a < at + len && at < b {
                at = a.saturating_sub(len) & !0xfff;
                continue 'search;
            }
        }
        return Ok(at);
    }
    Err("no free address range for the restorer's code page".into())
}

impl Builder<'_> {
    fn call(&mut self, nr: i64, args: [u64; 6], what: &str) -> Result<i64, String> {
        let pid = self.c.pid;
        self.c
            .call(pid, nr, args)
            .map_err(|e| format!("{what}: {e}"))
    }

    /// Put a NUL-terminated string into scratch; returns its address.
    fn put_str(&self, s: &str, at: usize) -> Result<u64, String> {
        if s.len() + 1 > SCRATCH_LEN - at {
            return Err(format!("path too long: {s}"));
        }
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        let addr = self.scratch + at as u64;
        self.c.write(addr, &b)?;
        Ok(addr)
    }

    fn put(&self, bytes: &[u8], at: usize) -> Result<u64, String> {
        let addr = self.scratch + at as u64;
        self.c.write(addr, bytes)?;
        Ok(addr)
    }

    /// Drop what the child inherited from procmig: rseq registration,
    /// descriptors, session, and every mapping but ours and the kernel's.
    fn clean(&mut self) -> Result<(), String> {
        let pid = self.c.pid;
        if let Some(r) = super::sys::get_rseq(pid)? {
            self.call(
                libc::SYS_rseq,
                [r.addr, r.len as u64, 1, r.sig as u64, 0, 0],
                "rseq unregister",
            )?;
        }
        self.call(
            libc::SYS_close_range,
            [0, u32::MAX as u64, 0, 0, 0, 0],
            "close_range",
        )?;
        self.call(libc::SYS_setsid, [0; 6], "setsid")?;
        for (a, b, name) in child_maps(pid)? {
            if a == self.code || is_kernel_name(&name) || name == "[vsyscall]" {
                continue;
            }
            self.call(libc::SYS_munmap, [a, b - a, 0, 0, 0, 0], "munmap")?;
        }
        Ok(())
    }

    /// Move the child's vDSO and vvar pages to the old addresses: they must
    /// have the same sizes and the same distances (the same kernel build).
    fn kernel_mappings(&mut self) -> Result<(), String> {
        let mine: Vec<(u64, u64, String)> = child_maps(self.c.pid)?
            .into_iter()
            .filter(|(_, _, n)| is_kernel_name(n))
            .collect();
        let theirs: Vec<&Mapping> = self
            .st
            .mappings
            .iter()
            .filter(|m| m.backing == Backing::Kernel)
            .collect();
        if theirs.is_empty() {
            for (a, b, _) in mine {
                self.call(libc::SYS_munmap, [a, b - a, 0, 0, 0, 0], "munmap vdso")?;
            }
            return Ok(());
        }
        let same = mine.len() == theirs.len()
            && mine.iter().zip(&theirs).all(|((a, b, n), m)| {
                b - a == m.len()
                    && *n == m.name
                    && (m.start.wrapping_sub(*a) == theirs[0].start.wrapping_sub(mine[0].0))
            });
        if !same {
            return Err(
                "the vDSO here differs from the source's (another kernel): cannot restore".into(),
            );
        }
        let delta = theirs[0].start.wrapping_sub(mine[0].0);
        if delta == 0 {
            return Ok(());
        }
        let lo = mine[0].0;
        let hi = mine.last().expect("not empty").1;
        // Moving may overlap the old place: go through a free spot.
        let tmp = free_range(self.st, self.c.pid, hi - lo)?;
        for via in [tmp.wrapping_sub(lo), theirs[0].start.wrapping_sub(tmp)] {
            let now: Vec<(u64, u64, String)> = child_maps(self.c.pid)?
                .into_iter()
                .filter(|(_, _, n)| is_kernel_name(n))
                .collect();
            for (a, b, _) in now {
                let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
                self.call(
                    libc::SYS_mremap,
                    [a, b - a, b - a, flags, a.wrapping_add(via), 0],
                    "mremap vdso",
                )?;
            }
        }
        Ok(())
    }

    fn mappings(&mut self, mem: &Memory) -> Result<(), String> {
        let st = self.st;
        for m in &st.mappings {
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

    /// Post-copy (the missing pages were not filled): create a
    /// userfaultfd in the process, take it here, and register every
    /// migrated private anonymous mapping for missing pages. The uffd is
    /// made inside the process (injected) so that it belongs to its memory;
    /// procmig holds the only descriptor.
    fn userfaultfd(&mut self) -> Result<std::os::fd::OwnedFd, String> {
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
    fn fill(&mut self, m: &Mapping, mem: &Memory) -> Result<(), String> {
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
    fn copy_run(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String> {
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

    fn copy_unskipped(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String> {
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
    fn copy_in(&self, addr: u64, bytes: &[u8]) -> Result<(), String> {
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

    fn mm(&mut self) -> Result<(), String> {
        let mm = &self.st.mm;
        let path = self.put_str(&self.st.exe.path, 2048)?;
        let exe_fd = self.call(
            libc::SYS_openat,
            [libc::AT_FDCWD as u64, path, libc::O_RDONLY as u64, 0, 0, 0],
            "opening the executable",
        )? as u64;
        let auxv: Vec<u8> = mm.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
        let auxv_addr = self.put(&auxv, 1024)?;
        let mut s = Vec::new();
        for v in [
            mm.start_code,
            mm.end_code,
            mm.start_data,
            mm.end_data,
            mm.start_brk,
            mm.brk,
            mm.start_stack,
            mm.arg_start,
            mm.arg_end,
            mm.env_start,
            mm.env_end,
            auxv_addr,
        ] {
            s.extend_from_slice(&v.to_le_bytes());
        }
        s.extend_from_slice(&(auxv.len() as u32).to_le_bytes());
        s.extend_from_slice(&(exe_fd as u32).to_le_bytes());
        let addr = self.put(&s, 0)?;
        let r = self.call(
            libc::SYS_prctl,
            [
                libc::PR_SET_MM as u64,
                libc::PR_SET_MM_MAP as u64,
                addr,
                s.len() as u64,
                0,
                0,
            ],
            "prctl(PR_SET_MM_MAP)",
        );
        self.call(libc::SYS_close, [exe_fd, 0, 0, 0, 0, 0], "close")?;
        r.map(|_| ())
    }

    /// Open `path` in the child with `flags`; returns the new fd.
    fn open(&mut self, path: &str, flags: i32) -> Result<u64, String> {
        let p = self.put_str(path, 0)?;
        Ok(self.call(
            libc::SYS_openat,
            [libc::AT_FDCWD as u64, p, flags as u64, 0o644, 0, 0],
            &format!("opening {path}"),
        )? as u64)
    }

    /// Move a fresh descriptor above every target number.
    fn park(&mut self, fd: u64) -> Result<u64, String> {
        let parked = self.call(
            libc::SYS_fcntl,
            [fd, libc::F_DUPFD as u64, self.park_at, 0, 0, 0],
            "fcntl(F_DUPFD)",
        )? as u64;
        self.call(libc::SYS_close, [fd, 0, 0, 0, 0, 0], "close")?;
        Ok(parked)
    }

    fn fds(&mut self, opts: &RestoreOptions) -> Result<(), String> {
        let st = self.st;
        // Room to park descriptors above every number the process uses:
        // the soft limit up to the hard one (no privilege needed).
        let mut lim = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 writes the old limit into `lim`, then reads
        // the new one from it.
        unsafe {
            libc::prlimit64(self.c.pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut lim);
            lim.rlim_cur = lim.rlim_max;
            libc::prlimit64(self.c.pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut());
        }
        let needed = self.park_at + 2 * st.fds.len() as u64 + 2;
        if needed > lim.rlim_cur {
            return Err(format!(
                "the process uses descriptor numbers up to {}, beyond this side's limit of {}",
                self.park_at - 1,
                lim.rlim_cur
            ));
        }
        // Pipes: one pipe per id, both ends parked.
        let mut pipes: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
        let mut placed: Vec<(i32, u64)> = Vec::new();
        for f in &st.fds {
            let nonblock = f.flags & libc::O_NONBLOCK as u32;
            let fd: u64 = match &f.kind {
                FdKind::Path { path, pos, .. } => {
                    let keep = !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_CLOEXEC);
                    let fd = self.open(path, f.flags as i32 & keep)?;
                    let fd = self.park(fd)?;
                    if *pos != 0 {
                        self.call(libc::SYS_lseek, [fd, *pos, 0, 0, 0, 0], "lseek")?;
                    }
                    fd
                }
                FdKind::Stdio { what } => {
                    let stdio = opts.stdio.to_string_lossy().into_owned();
                    self.notes
                        .push(format!("fd {} ({what}) now opens {stdio} (--stdio)", f.fd));
                    let fd = self
                        .open(&stdio, libc::O_RDWR | libc::O_CREAT | libc::O_APPEND)
                        .or_else(|_| self.open(&stdio, libc::O_RDONLY))?;
                    self.park(fd)?
                }
                FdKind::Pipe { id, write_end, .. } => {
                    let (r, w) = match pipes.get(id) {
                        Some(&p) => p,
                        None => {
                            let at = self.scratch;
                            self.call(libc::SYS_pipe2, [at, 0, 0, 0, 0, 0], "pipe2")?;
                            let mut b = [0u8; 8];
                            self.c.read(at, &mut b)?;
                            let r = u32::from_le_bytes(b[..4].try_into().expect("4")) as u64;
                            let w = u32::from_le_bytes(b[4..].try_into().expect("4")) as u64;
                            let p = (self.park(r)?, self.park(w)?);
                            pipes.insert(*id, p);
                            p
                        }
                    };
                    let end = if *write_end { w } else { r };
                    self.call(
                        libc::SYS_fcntl,
                        [end, libc::F_DUPFD as u64, self.park_at, 0, 0, 0],
                        "fcntl(F_DUPFD)",
                    )? as u64
                }
                FdKind::Eventfd { semaphore, .. } => {
                    let flags = if *semaphore { libc::EFD_SEMAPHORE } else { 0 };
                    let fd = self.call(
                        libc::SYS_eventfd2,
                        [0, flags as u64, 0, 0, 0, 0],
                        "eventfd2",
                    )?;
                    self.park(fd as u64)?
                }
                FdKind::Epoll { .. } => {
                    let fd = self.call(libc::SYS_epoll_create1, [0; 6], "epoll_create1")?;
                    self.park(fd as u64)?
                }
                FdKind::Timerfd { clockid, times } => {
                    let fd = self.call(
                        libc::SYS_timerfd_create,
                        [*clockid as u64, 0, 0, 0, 0, 0],
                        "timerfd_create",
                    )? as u64;
                    if times[2] != 0 || times[3] != 0 {
                        let b: Vec<u8> = times.iter().flat_map(|t| t.to_le_bytes()).collect();
                        let a = self.put(&b, 0)?;
                        self.call(
                            libc::SYS_timerfd_settime,
                            [fd, 0, a, 0, 0, 0],
                            "timerfd_settime",
                        )?;
                    }
                    self.park(fd)?
                }
                FdKind::Signalfd { mask } => {
                    let a = self.put(&mask.to_le_bytes(), 0)?;
                    let fd =
                        self.call(libc::SYS_signalfd4, [u64::MAX, a, 8, 0, 0, 0], "signalfd4")?;
                    self.park(fd as u64)?
                }
                FdKind::Listen {
                    domain,
                    addr,
                    backlog,
                } => self.listen(f.fd, *domain, addr, *backlog)?,
                FdKind::Connected { what } => {
                    let at = self.scratch;
                    self.call(
                        libc::SYS_socketpair,
                        [libc::AF_UNIX as u64, libc::SOCK_STREAM as u64, 0, at, 0, 0],
                        "socketpair",
                    )?;
                    let mut b = [0u8; 8];
                    self.c.read(at, &mut b)?;
                    let a = u32::from_le_bytes(b[..4].try_into().expect("4")) as u64;
                    let z = u32::from_le_bytes(b[4..].try_into().expect("4")) as u64;
                    self.call(libc::SYS_close, [z, 0, 0, 0, 0, 0], "close")?;
                    self.notes.push(format!(
                        "fd {} ({what}) is now a socket whose peer closed",
                        f.fd
                    ));
                    self.park(a)?
                }
            };
            if nonblock != 0 && !matches!(f.kind, FdKind::Path { .. }) {
                self.call(
                    libc::SYS_fcntl,
                    [fd, libc::F_SETFL as u64, nonblock as u64, 0, 0, 0],
                    "fcntl(F_SETFL)",
                )?;
            }
            placed.push((f.fd, fd));
        }
        // Move each to its number.
        for &(target, parked) in &placed {
            let cloexec = st
                .fds
                .iter()
                .find(|f| f.fd == target)
                .is_some_and(|f| f.flags & libc::O_CLOEXEC as u32 != 0);
            let flags = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
            self.call(
                libc::SYS_dup3,
                [parked, target as u64, flags, 0, 0, 0],
                "dup3",
            )?;
        }
        for &(_, parked) in &placed {
            self.call(libc::SYS_close, [parked, 0, 0, 0, 0, 0], "close")?;
        }
        for (_, (r, w)) in pipes {
            self.call(libc::SYS_close, [r, 0, 0, 0, 0, 0], "close")?;
            self.call(libc::SYS_close, [w, 0, 0, 0, 0, 0], "close")?;
        }
        self.fd_contents()?;
        Ok(())
    }

    fn listen(&mut self, fd: i32, domain: i32, addr: &[u8], backlog: i32) -> Result<u64, String> {
        let s = self.call(
            libc::SYS_socket,
            [domain as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0],
            "socket",
        )? as u64;
        let one = self.put(&1i32.to_le_bytes(), 0)?;
        self.call(
            libc::SYS_setsockopt,
            [
                s,
                libc::SOL_SOCKET as u64,
                libc::SO_REUSEADDR as u64,
                one,
                4,
                0,
            ],
            "setsockopt",
        )?;
        let a = self.put(addr, 64)?;
        let pid = self.c.pid;
        let bound = self
            .c
            .call_raw(pid, libc::SYS_bind, [s, a, addr.len() as u64, 0, 0, 0])?;
        if bound == -(libc::EADDRINUSE as i64) && self.st.boot_id == super::capture::boot_id() {
            // The source, on this machine, still holds the address: share
            // its socket (it never runs again once the process is handed
            // over; pending connections are accepted here).
            self.call(libc::SYS_close, [s, 0, 0, 0, 0, 0], "close")?;
            let pidfd = self.call(
                libc::SYS_pidfd_open,
                [self.st.pid as u64, 0, 0, 0, 0, 0],
                "pidfd_open of the source",
            )? as u64;
            let got = self.call(
                libc::SYS_pidfd_getfd,
                [pidfd, fd as u64, 0, 0, 0, 0],
                "pidfd_getfd of the source's listening socket",
            );
            self.call(libc::SYS_close, [pidfd, 0, 0, 0, 0, 0], "close")?;
            self.notes.push(format!(
                "fd {fd}: listening socket shared with the source process (same machine, address in use)"
            ));
            return self.park(got? as u64);
        }
        if bound < 0 {
            return Err(format!(
                "binding fd {fd} again: {}",
                std::io::Error::from_raw_os_error(-bound as i32)
            ));
        }
        self.call(libc::SYS_listen, [s, backlog as u64, 0, 0, 0, 0], "listen")?;
        self.park(s)
    }

    /// Pipe data, eventfd counts and epoll registrations, once every
    /// descriptor is at its number.
    fn fd_contents(&mut self) -> Result<(), String> {
        let st = self.st;
        for f in &st.fds {
            match &f.kind {
                FdKind::Pipe {
                    id,
                    data,
                    write_end: false,
                } if !data.is_empty() => {
                    let w = st
                        .fds
                        .iter()
                        .find(|g| matches!(&g.kind, FdKind::Pipe { id: i, write_end: true, .. } if i == id))
                        .ok_or("a pipe without its write end")?;
                    let ours = crate::process::take_remote_fd(self.c.pid, w.fd)
                        .map_err(|e| e.to_string())?;
                    write_all(ours.as_raw_fd(), data)?;
                }
                FdKind::Eventfd { count, .. } if *count > 0 => {
                    let ours = crate::process::take_remote_fd(self.c.pid, f.fd)
                        .map_err(|e| e.to_string())?;
                    write_all(ours.as_raw_fd(), &count.to_ne_bytes())?;
                }
                FdKind::Epoll { targets } => {
                    for &[tfd, events, data] in targets {
                        let mut ev = Vec::new();
                        ev.extend_from_slice(&(events as u32).to_le_bytes());
                        ev.extend_from_slice(&data.to_le_bytes());
                        let a = self.put(&ev, 0)?;
                        self.call(
                            libc::SYS_epoll_ctl,
                            [f.fd as u64, libc::EPOLL_CTL_ADD as u64, tfd, a, 0, 0],
                            &format!("epoll_ctl(ADD {tfd}) on fd {}", f.fd),
                        )?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Signal handlers, cwd, umask, resource limits.
    fn process_wide(&mut self) -> Result<(), String> {
        let st = self.st;
        for a in &st.sigactions {
            let mut b = Vec::new();
            for v in [a.handler, a.flags, a.restorer, a.mask] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            let addr = self.put(&b, 0)?;
            self.call(
                libc::SYS_rt_sigaction,
                [a.signo as u64, addr, 0, 8, 0, 0],
                &format!("rt_sigaction({})", a.signo),
            )?;
        }
        let cwd = self.put_str(&st.cwd, 0)?;
        self.call(
            libc::SYS_chdir,
            [cwd, 0, 0, 0, 0, 0],
            &format!("chdir {}", st.cwd),
        )?;
        self.call(libc::SYS_umask, [st.umask as u64, 0, 0, 0, 0, 0], "umask")?;
        for (res, l) in st.rlimits.iter().enumerate() {
            let lim = libc::rlimit64 {
                rlim_cur: l[0],
                rlim_max: l[1],
            };
            // SAFETY: prlimit64 reads the new limit from `lim`.
            if unsafe { libc::prlimit64(self.c.pid, res as _, &lim, std::ptr::null_mut()) } < 0 {
                self.notes.push(format!(
                    "resource limit {res} not restored: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(())
    }

    /// Create the other threads, then give each its per-thread kernel
    /// state.
    fn threads(&mut self, same_ids: bool) -> Result<(), String> {
        let st = self.st;
        for t in &st.threads[1..] {
            let scratch = self.scratch;
            self.c.clone_thread(same_ids.then_some(t.tid), scratch)?;
        }
        let tids = self.c.threads.clone();
        for (t, tid) in st.threads.iter().zip(&tids) {
            let tid = *tid;
            let call = |c: &mut Child, nr: i64, args: [u64; 6], what: &str| {
                c.call(tid, nr, args)
                    .map_err(|e| format!("{what} in thread {}: {e}", t.tid))
            };
            call(
                &mut self.c,
                libc::SYS_set_tid_address,
                [t.clear_child_tid, 0, 0, 0, 0, 0],
                "set_tid_address",
            )?;
            if t.robust_list[0] != 0 {
                call(
                    &mut self.c,
                    libc::SYS_set_robust_list,
                    [t.robust_list[0], t.robust_list[1], 0, 0, 0, 0],
                    "set_robust_list",
                )?;
            }
            if let Some(r) = t.rseq {
                call(
                    &mut self.c,
                    libc::SYS_rseq,
                    [r.addr, r.len as u64, 0, r.sig as u64, 0, 0],
                    "rseq",
                )?;
            }
            if t.altstack[1] & libc::SS_DISABLE as u64 == 0 {
                let mut b = Vec::new();
                b.extend_from_slice(&t.altstack[0].to_le_bytes());
                let flags = (t.altstack[1] as u32) & !(libc::SS_ONSTACK as u32);
                b.extend_from_slice(&flags.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                b.extend_from_slice(&t.altstack[2].to_le_bytes());
                let a = self.put(&b, 0)?;
                call(
                    &mut self.c,
                    libc::SYS_sigaltstack,
                    [a, 0, 0, 0, 0, 0],
                    "sigaltstack",
                )?;
            }
            let name = self.put_str(&t.comm, 0)?;
            call(
                &mut self.c,
                libc::SYS_prctl,
                [libc::PR_SET_NAME as u64, name, 0, 0, 0, 0],
                "prctl(PR_SET_NAME)",
            )?;
        }
        Ok(())
    }

    /// Credentials, no parent-death signal, the code page gone, and every
    /// thread's own registers.
    fn finish(&mut self) -> Result<(), String> {
        let st = self.st;
        // Post-copy: the process dies with the restorer until every page
        // is in (`clear_parent_death_signal` then), so it never runs on
        // with memory that will not come.
        if self.skip.is_empty() {
            self.call(
                libc::SYS_prctl,
                [libc::PR_SET_PDEATHSIG as u64, 0, 0, 0, 0, 0],
                "prctl(PR_SET_PDEATHSIG)",
            )?;
        }
        let c = &st.creds;
        let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
        let g = self.put(&groups, 0)?;
        self.call(
            libc::SYS_setgroups,
            [c.groups.len() as u64, g, 0, 0, 0, 0],
            "setgroups",
        )?;
        self.call(
            libc::SYS_setresgid,
            [c.gid[0] as u64, c.gid[1] as u64, c.gid[2] as u64, 0, 0, 0],
            "setresgid",
        )?;
        self.call(
            libc::SYS_setresuid,
            [c.uid[0] as u64, c.uid[1] as u64, c.uid[2] as u64, 0, 0, 0],
            "setresuid",
        )?;
        if !self.skip.is_empty() {
            // Changing credentials cleared it: set it again.
            self.call(
                libc::SYS_prctl,
                [
                    libc::PR_SET_PDEATHSIG as u64,
                    libc::SIGKILL as u64,
                    0,
                    0,
                    0,
                    0,
                ],
                "prctl(PR_SET_PDEATHSIG)",
            )?;
        }
        // setresuid clears the dumpable flag; the source's was set.
        self.call(
            libc::SYS_prctl,
            [libc::PR_SET_DUMPABLE as u64, 1, 0, 0, 0, 0],
            "prctl(PR_SET_DUMPABLE)",
        )?;
        self.c.unmap_code(CODE_PAGES * 4096)?;
        let tids = self.c.threads.clone();
        for (t, tid) in st.threads.iter().zip(&tids) {
            self.c.set_thread(*tid, &t.regs, &t.xstate, t.sigmask)?;
        }
        Ok(())
    }
}

fn is_kernel_name(n: &str) -> bool {
    n.starts_with("[vdso") || n.starts_with("[vvar")
}

/// After post-copy: the restored process no longer dies with procmig
/// (it did meanwhile: without the restorer, its missing pages would never
/// come). It is stopped for the one call.
pub fn clear_parent_death_signal(pid: i32) -> Result<(), String> {
    let mut att = crate::process::Attachment::seize(pid).map_err(|e| e.to_string())?;
    att.stop().map_err(|e| e.to_string())?;
    let tid = att.tids()[0];
    let r = att
        .inject_syscall(
            tid,
            libc::SYS_prctl,
            [libc::PR_SET_PDEATHSIG as u64, 0, 0, 0, 0, 0],
        )
        .map_err(|e| e.to_string());
    att.detach(crate::process::Leave::AsFound)
        .map_err(|e| e.to_string())?;
    match r? {
        0 => Ok(()),
        e => Err(format!(
            "prctl(PR_SET_PDEATHSIG): {}",
            std::io::Error::from_raw_os_error(-e as i32)
        )),
    }
}

/// Ranges sorted and merged.
fn merged(r: &[(u64, u64)]) -> Vec<(u64, u64)> {
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
fn resident_pages(map: &[u8]) -> Vec<bool> {
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

fn write_all(fd: i32, mut data: &[u8]) -> Result<(), String> {
    while !data.is_empty() {
        // SAFETY: writing from a live slice.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n <= 0 {
            return Err(format!("write: {}", std::io::Error::last_os_error()));
        }
        data = &data[n as usize..];
    }
    Ok(())
}
