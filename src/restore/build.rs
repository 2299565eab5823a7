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
//! The result is stopped; [`Restored::start`] lets it run. Steps 3 and 6
//! live in `memory.rs` and `descriptors.rs`.

use std::fs::File;

use super::child::Child;
use super::shell::Shell;
use super::state::*;

/// Pages of the code page: one of code, the rest scratch for arguments.
const CODE_PAGES: u64 = super::shell::CODE_LEN / 4096;
pub(super) const SCRATCH_LEN: usize = 3 * 4096;

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
    /// Built during pre-copy (its memory filled as pages arrived).
    pub early: bool,
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

pub(super) struct Builder<'a> {
    pub(super) c: Child,
    pub(super) st: &'a ProcessState,
    pub(super) code: u64,
    pub(super) scratch: u64,
    pub(super) notes: Vec<String>,
    pub(super) copy_time: std::time::Duration,
    /// Post-copy: address ranges not to fill (sorted, disjoint).
    pub(super) skip: Vec<(u64, u64)>,
    /// Descriptors are parked at or above this (past every number the
    /// process uses) before they are moved to their numbers.
    pub(super) park_at: u64,
    /// Mappings kept from the shell, already holding their data (sorted).
    pub(super) kept: Vec<(u64, u64)>,
}

/// Rebuild the process `st` describes, with `mem` holding its migrated
/// memory. It is left stopped. With `missing` (post-copy), those address
/// ranges are left unpopulated and a userfaultfd is made for them.
///
/// With `shell` (built during pre-copy, [`Shell`]), the process is that
/// shell: its private anonymous memory already holds the image's data and
/// is kept; a shell that cannot serve is dropped and the process built
/// afresh (the reason is in the notes).
pub fn restore(
    st: &ProcessState,
    mem: &Memory,
    opts: &RestoreOptions,
    missing: Option<&[(u64, u64)]>,
    shell: Option<Shell>,
) -> Result<Restored, String> {
    check_files(st)?;
    let mut notes = Vec::new();
    let prebuilt = match shell.map(|s| s.take(st)) {
        Some(Ok(p)) => Some(p),
        Some(Err(why)) => {
            notes.push(format!("not built during pre-copy: {why}"));
            None
        }
        None => None,
    };
    let early = prebuilt.is_some();
    let (c, code, filled, dropped) = match prebuilt {
        Some(p) => (p.c, p.code, p.filled, p.dropped),
        None => {
            let mut c = Child::spawn(opts.same_pid.then_some(st.pid))
                .map_err(|e| format!("creating process {}: {e}", st.pid))?;
            let code = free_range(st, c.pid, CODE_PAGES * 4096)?;
            c.map_code(code, CODE_PAGES * 4096)
                .map_err(|e| format!("preparing the new process: {e}"))?;
            (c, code, Vec::new(), Vec::new())
        }
    };
    let mut b = Builder {
        c,
        st,
        code,
        scratch: code + 4096,
        notes,
        copy_time: std::time::Duration::ZERO,
        skip: missing.map(super::memory::merged).unwrap_or_default(),
        park_at: st
            .fds
            .iter()
            .map(|f| f.fd as u64 + 1)
            .max()
            .unwrap_or(0)
            .max(3),
        kept: Vec::new(),
    };
    if early {
        b.keep_filled(&filled)?;
    } else {
        b.clean()?;
    }
    b.kernel_mappings()?;
    b.mappings(mem)?;
    b.drop_missing_kept(&dropped)?;
    let uffd = match missing {
        Some(_) => Some(b.userfaultfd()?),
        None => None,
    };
    if early {
        // The shell had huge pages off while it was filled (khugepaged
        // could have collapsed absent pages into zeros); the userfaultfd
        // now guards what is absent.
        b.call(
            libc::SYS_prctl,
            [libc::PR_SET_THP_DISABLE as u64, 0, 0, 0, 0, 0],
            "prctl(PR_SET_THP_DISABLE)",
        )?;
    }
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
        early,
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
    // A file mapped several times (a library's segments) is checked once.
    let mut checked: Vec<&FileRef> = Vec::new();
    let files = st.mappings.iter().filter_map(|m| match &m.backing {
        Backing::File(r) if !m.migrated || !m.shared() => Some(r),
        _ => None,
    });
    for r in std::iter::once(&st.exe).chain(files) {
        if !checked.contains(&r) {
            check(r)?;
            checked.push(r);
        }
    }
    Ok(())
}

/// The child's mappings: (start, end, name).
pub(super) fn child_maps(pid: i32) -> Result<Vec<(u64, u64, String)>, String> {
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
    let used: Vec<(u64, u64)> = st.mappings.iter().map(|m| (m.start, m.end)).collect();
    free_range_among(used, pid, len)
}

/// A free range of `len` bytes away from `used` and the child's mappings.
pub(super) fn free_range_among(
    mut used: Vec<(u64, u64)>,
    pid: i32,
    len: u64,
) -> Result<u64, String> {
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
    pub(super) fn call(&mut self, nr: i64, args: [u64; 6], what: &str) -> Result<i64, String> {
        let pid = self.c.pid;
        self.c
            .call(pid, nr, args)
            .map_err(|e| format!("{what}: {e}"))
    }

    /// Put a NUL-terminated string into scratch; returns its address.
    pub(super) fn put_str(&self, s: &str, at: usize) -> Result<u64, String> {
        if s.len() + 1 > SCRATCH_LEN - at {
            return Err(format!("path too long: {s}"));
        }
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        let addr = self.scratch + at as u64;
        self.c.write(addr, &b)?;
        Ok(addr)
    }

    pub(super) fn put(&self, bytes: &[u8], at: usize) -> Result<u64, String> {
        let addr = self.scratch + at as u64;
        self.c.write(addr, bytes)?;
        Ok(addr)
    }

    /// Drop what the child inherited from procmig.
    fn clean(&mut self) -> Result<(), String> {
        strip(&mut self.c, self.code)
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
        let used = self.st.mappings.iter().map(|m| (m.start, m.end)).collect();
        shift_kernel_mappings(&mut self.c, used, delta)
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
        if st.no_new_privs {
            self.call(
                libc::SYS_prctl,
                [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
                "prctl(PR_SET_NO_NEW_PRIVS)",
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

/// Drop what a new child inherited from procmig: rseq registration,
/// descriptors, session, and every mapping but the code page at `code` and
/// the kernel's.
pub(super) fn strip(c: &mut Child, code: u64) -> Result<(), String> {
    let pid = c.pid;
    let mut call = |nr: i64, args: [u64; 6], what: &str| {
        c.call(pid, nr, args).map_err(|e| format!("{what}: {e}"))
    };
    if let Some(r) = super::sys::get_rseq(pid)? {
        call(
            libc::SYS_rseq,
            [r.addr, r.len as u64, 1, r.sig as u64, 0, 0],
            "rseq unregister",
        )?;
    }
    call(
        libc::SYS_close_range,
        [0, u32::MAX as u64, 0, 0, 0, 0],
        "close_range",
    )?;
    call(libc::SYS_setsid, [0; 6], "setsid")?;
    for (a, b, name) in child_maps(pid)? {
        if a == code || is_kernel_name(&name) || name == "[vsyscall]" {
            continue;
        }
        call(libc::SYS_munmap, [a, b - a, 0, 0, 0, 0], "munmap")?;
    }
    Ok(())
}

/// Move the child's vDSO and vvar pages by `delta` together (their
/// distances kept), through a free spot (away from `used`) when the move
/// overlaps their current place.
pub(super) fn shift_kernel_mappings(
    c: &mut Child,
    used: Vec<(u64, u64)>,
    delta: u64,
) -> Result<(), String> {
    if delta == 0 {
        return Ok(());
    }
    let mine = kernel_ranges(c.pid)?;
    let (Some(&(lo, _)), Some(&(_, hi))) = (mine.first(), mine.last()) else {
        return Ok(());
    };
    let to = lo.wrapping_add(delta);
    let vias = if to < hi && lo < to + (hi - lo) {
        let tmp = free_range_among(used, c.pid, hi - lo)?;
        vec![tmp.wrapping_sub(lo), to.wrapping_sub(tmp)]
    } else {
        vec![delta]
    };
    let pid = c.pid;
    for via in vias {
        for (a, b) in kernel_ranges(c.pid)? {
            let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
            c.call(
                pid,
                libc::SYS_mremap,
                [a, b - a, b - a, flags, a.wrapping_add(via), 0],
            )
            .map_err(|e| format!("mremap vdso: {e}"))?;
        }
    }
    Ok(())
}

/// Where the child's vDSO and vvar pages are, in order.
pub(super) fn kernel_ranges(pid: i32) -> Result<Vec<(u64, u64)>, String> {
    Ok(child_maps(pid)?
        .into_iter()
        .filter(|(_, _, n)| is_kernel_name(n))
        .map(|(a, b, _)| (a, b))
        .collect())
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
