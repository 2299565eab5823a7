//! Capturing what restore needs from a stopped process: registers and
//! per-thread kernel state, signal handlers, mappings, the mm fields, file
//! descriptors, credentials and limits.
//!
//! Everything is read from /proc and ptrace, except what only the process
//! itself can ask the kernel (its brk, each thread's clear_child_tid and
//! alternate signal stack, its signal handlers): those calls are injected
//! into it, with a scratch page mapped in it for their results and
//! unmapped again.

use std::os::unix::fs::MetadataExt;

use nix::sys::ptrace;
use nix::unistd::Pid;
use procfs::process::{MMPermissions, MMapPath, Process};

use super::fds::read_fds;
use super::state::*;
use super::sys;
use crate::process::{Attachment, MemReader, Pagemap, PM_PRESENT, PM_SWAPPED};

/// A page of a file mapping that is file-backed (not a private copy).
const PM_FILE: u64 = 1 << 61;

/// Capture the state of the process `att` holds, every thread stopped.
/// `migrated` are the address ranges whose contents the image holds.
/// Descriptors restore cannot recreate are listed in `refused`.
pub fn capture(
    att: &mut Attachment,
    migrated: &[(u64, u64)],
) -> Result<(ProcessState, Vec<String>), String> {
    let pid = att.pid();
    let main = att.tids()[0];
    let exe = file_ref(&format!("/proc/{pid}/exe"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    let mappings = mappings(pid, migrated)?;
    let (fds, refused) = read_fds(pid)?;
    let mut st = ProcessState {
        version: STATE_VERSION,
        pid,
        comm: read_trim(&format!("/proc/{pid}/comm")),
        boot_id: boot_id(),
        exe,
        cwd: std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map_err(|e| format!("cannot read the cwd of {pid}: {e}"))?
            .to_string_lossy()
            .into_owned(),
        umask: status_field(&status, "Umask:")
            .and_then(|v| u32::from_str_radix(v, 8).ok())
            .unwrap_or(0o022),
        rlimits: rlimits(pid)?,
        creds: creds(&status)?,
        no_new_privs: status_field(&status, "NoNewPrivs:") == Some("1"),
        mm: mm_fields(pid)?,
        threads: Vec::new(),
        sigactions: Vec::new(),
        mappings,
        fds,
        extra_pages: Vec::new(),
    };
    let scratch = Scratch::map(att, main)?;
    let r = (|| {
        st.mm.brk = scratch.call(att, main, libc::SYS_brk, [0; 6], "brk")? as u64;
        for tid in att.tids() {
            st.threads.push(thread_state(att, &scratch, pid, tid)?);
        }
        for signo in 1..=64u64 {
            if signo == libc::SIGKILL as u64 || signo == libc::SIGSTOP as u64 {
                continue;
            }
            let args = [signo, 0, scratch.addr, 8, 0, 0];
            scratch.call(att, main, libc::SYS_rt_sigaction, args, "rt_sigaction")?;
            let w = scratch.read_words(att, main, 4)?;
            st.sigactions.push(SigAction {
                signo: signo as u32,
                handler: w[0],
                flags: w[1],
                restorer: w[2],
                mask: w[3],
            });
        }
        Ok::<(), String>(())
    })();
    scratch.unmap(att, main);
    r?;
    st.extra_pages = extra_pages(pid, &st.mappings)?;
    Ok((st, refused))
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

pub(super) fn boot_id() -> String {
    read_trim("/proc/sys/kernel/random/boot_id")
}

/// The identity of the file at `path` (followed).
pub(super) fn file_ref(path: &str) -> Result<FileRef, String> {
    let m = std::fs::metadata(path).map_err(|e| format!("cannot stat {path}: {e}"))?;
    let shown = std::fs::read_link(path)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| path.to_string());
    Ok(FileRef {
        path: shown,
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
    })
}

fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

fn creds(status: &str) -> Result<Creds, String> {
    let ids = |key: &str| -> Result<[u32; 3], String> {
        let v: Vec<u32> = status_field(status, key)
            .ok_or(format!("no {key} in status"))?
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        if v.len() < 3 {
            return Err(format!("bad {key} line in status"));
        }
        Ok([v[0], v[1], v[2]])
    };
    Ok(Creds {
        uid: ids("Uid:")?,
        gid: ids("Gid:")?,
        groups: status_field(status, "Groups:")
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect(),
    })
}

fn rlimits(pid: i32) -> Result<Vec<[u64; 2]>, String> {
    let mut out = Vec::new();
    for res in 0..16 {
        let mut old = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 with no new limit writes the old one into `old`.
        let r = unsafe { libc::prlimit64(pid, res as _, std::ptr::null(), &mut old) };
        if r < 0 {
            return Err(format!(
                "prlimit on {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        out.push([old.rlim_cur, old.rlim_max]);
    }
    Ok(out)
}

/// The mm fields from /proc/PID/stat (fields 26-28 and 45-51) and the
/// auxiliary vector. brk is filled in by an injected brk(0).
fn mm_fields(pid: i32) -> Result<MmFields, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    // Field 3 (state) is the first word after the command name.
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|w| w.parse().unwrap_or(0))
        .collect();
    let at = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    let auxv = std::fs::read(format!("/proc/{pid}/auxv"))
        .map_err(|e| format!("cannot read /proc/{pid}/auxv: {e}"))?;
    Ok(MmFields {
        start_code: at(26),
        end_code: at(27),
        start_stack: at(28),
        start_data: at(45),
        end_data: at(46),
        start_brk: at(47),
        brk: at(47),
        arg_start: at(48),
        arg_end: at(49),
        env_start: at(50),
        env_end: at(51),
        auxv: auxv
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    })
}

fn mappings(pid: i32, migrated: &[(u64, u64)]) -> Result<Vec<Mapping>, String> {
    let proc = Process::new(pid).map_err(|e| format!("process {pid}: {e}"))?;
    let maps = proc.maps().map_err(|e| format!("maps of {pid}: {e}"))?;
    let mut out = Vec::new();
    for m in maps {
        let (start, end) = m.address;
        let shared = m.perms.contains(MMPermissions::SHARED);
        let mut perms = String::new();
        for (flag, c) in [
            (MMPermissions::READ, 'r'),
            (MMPermissions::WRITE, 'w'),
            (MMPermissions::EXECUTE, 'x'),
        ] {
            perms.push(if m.perms.contains(flag) { c } else { '-' });
        }
        perms.push(if shared { 's' } else { 'p' });
        let name = crate::process::path_name(&m.pathname);
        let backing = match &m.pathname {
            MMapPath::Vdso | MMapPath::Vvar => Backing::Kernel,
            MMapPath::Other(s) if s.starts_with("vvar") || s.starts_with("vdso") => Backing::Kernel,
            MMapPath::Vsyscall => Backing::Vsyscall,
            MMapPath::Path(p) => {
                let s = p.to_string_lossy();
                if shared
                    && (s.starts_with("/dev/zero")
                        || s.starts_with("/memfd:")
                        || s.starts_with("/SYSV"))
                {
                    Backing::SharedMemory
                } else {
                    let via = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
                    let mut r = file_ref(&via)?;
                    r.path = s.trim_end_matches(" (deleted)").to_string();
                    Backing::File(r)
                }
            }
            _ if shared => Backing::SharedMemory,
            _ => Backing::Anon,
        };
        let is_migrated = migrated.iter().any(|&(s, e)| s <= start && end <= e);
        out.push(Mapping {
            start,
            end,
            perms,
            offset: m.offset,
            name,
            backing,
            migrated: is_migrated,
        });
    }
    Ok(out)
}

/// A page mapped in the target for the results of injected calls.
struct Scratch {
    addr: u64,
}

impl Scratch {
    fn map(att: &mut Attachment, tid: i32) -> Result<Scratch, String> {
        let args = [
            0,
            4096,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ];
        let s = Scratch { addr: 0 };
        let addr = s.call(att, tid, libc::SYS_mmap, args, "mmap")?;
        Ok(Scratch { addr: addr as u64 })
    }

    fn call(
        &self,
        att: &mut Attachment,
        tid: i32,
        nr: i64,
        args: [u64; 6],
        what: &str,
    ) -> Result<i64, String> {
        let r = att
            .inject_syscall(tid, nr, args)
            .map_err(|e| format!("{what} in thread {tid}: {e}"))?;
        if (-4095..0).contains(&r) {
            return Err(format!(
                "{what} in thread {tid} failed: {}",
                std::io::Error::from_raw_os_error(-r as i32)
            ));
        }
        Ok(r)
    }

    fn read_words(&self, att: &Attachment, tid: i32, n: usize) -> Result<Vec<u64>, String> {
        let _ = att;
        (0..n)
            .map(|i| {
                ptrace::read(Pid::from_raw(tid), (self.addr + 8 * i as u64) as _)
                    .map(|w| w as u64)
                    .map_err(|e| format!("peek scratch: {e}"))
            })
            .collect()
    }

    fn unmap(&self, att: &mut Attachment, tid: i32) {
        if self.addr != 0 {
            let _ = att.inject_syscall(tid, libc::SYS_munmap, [self.addr, 4096, 0, 0, 0, 0]);
        }
    }
}

fn thread_state(
    att: &mut Attachment,
    scratch: &Scratch,
    pid: i32,
    tid: i32,
) -> Result<ThreadState, String> {
    let t = Pid::from_raw(tid);
    let regs = ptrace::getregs(t).map_err(|e| format!("getregs of {tid}: {e}"))?;
    let mut words = sys::regs_to_words(&regs);
    sys::resolve_restart(&mut words);
    let xstate = sys::get_xstate(tid)?;
    let sigmask = sys::get_sigmask(tid)?;
    let rseq = sys::get_rseq(tid)?;
    let robust_list = sys::get_robust_list(tid)?;
    let pr_get_tid_address = 40;
    scratch.call(
        att,
        tid,
        libc::SYS_prctl,
        [pr_get_tid_address, scratch.addr, 0, 0, 0, 0],
        "prctl(PR_GET_TID_ADDRESS)",
    )?;
    let clear_child_tid = scratch.read_words(att, tid, 1)?[0];
    scratch.call(
        att,
        tid,
        libc::SYS_sigaltstack,
        [0, scratch.addr, 0, 0, 0, 0],
        "sigaltstack",
    )?;
    let ss = scratch.read_words(att, tid, 3)?;
    Ok(ThreadState {
        tid,
        comm: read_trim(&format!("/proc/{pid}/task/{tid}/comm")),
        regs: words.to_vec(),
        xstate,
        sigmask,
        rseq,
        robust_list,
        clear_child_tid,
        altstack: [ss[0], ss[1] & 0xffff_ffff, ss[2]],
    })
}

/// Private copies in mappings the image does not hold: the pages of
/// read-only or inaccessible private mappings that were written before
/// their protection changed (relocations, RELRO), or that are anonymous.
fn extra_pages(pid: i32, mappings: &[Mapping]) -> Result<Vec<PageData>, String> {
    let ps = crate::process::page_size();
    let pagemap = Pagemap::open(pid, ps).map_err(|e| e.to_string())?;
    let mem = MemReader::open(pid).map_err(|e| e.to_string())?;
    let mut out: Vec<PageData> = Vec::new();
    let mut entries = vec![0u64; 512];
    for m in mappings {
        if m.migrated || m.shared() || !matches!(m.backing, Backing::Anon | Backing::File(_)) {
            continue;
        }
        let mut at = m.start;
        while at < m.end {
            let n = (((m.end - at) / ps) as usize).min(entries.len());
            pagemap
                .read(at, &mut entries[..n])
                .map_err(|e| e.to_string())?;
            for (i, e) in entries[..n].iter().enumerate() {
                let private = (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0;
                if !private {
                    continue;
                }
                let addr = at + i as u64 * ps;
                let mut page = vec![0u8; ps as usize];
                mem.read(addr, &mut page).map_err(|e| e.to_string())?;
                match out.last_mut() {
                    Some(last) if last.addr + last.data.len() as u64 == addr => {
                        last.data.extend_from_slice(&page)
                    }
                    _ => out.push(PageData { addr, data: page }),
                }
            }
            at += n as u64 * ps;
        }
    }
    Ok(out)
}
