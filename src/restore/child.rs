//! The process being restored: a child forked from procmig that stops at
//! once under our ptrace, and is then rebuilt by system calls injected at
//! a code page of its own (`syscall; int3`). Nothing in it runs until
//! [`Child::release`]; dropped before that, it is killed.
//!
//! ptrace binds the child to the thread that forked it: every method must
//! be called on that thread (`Child` is `!Send`).

use std::fs::File;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;

use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::sys;
use crate::process::syscall_regs;

/// struct clone_args (clone3, size version 2) asking for one pid: `tid`.
fn clone_args(flags: u64, exit_signal: u64, tid: &[i32; 1]) -> [u64; 11] {
    let mut a = [0u64; 11];
    a[0] = flags;
    a[4] = exit_signal;
    a[8] = tid.as_ptr() as u64;
    a[9] = 1;
    a
}

/// The child side of [`Child::spawn`]: die with the restorer, be traced
/// by it, stop. Its registers are replaced before it runs again. Only
/// raw system calls: after a clone3 no library state may be trusted.
fn stop_here() -> ! {
    // SAFETY: plain system calls with integer arguments.
    unsafe {
        libc::syscall(libc::SYS_prctl, libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0);
        let me = libc::syscall(libc::SYS_getpid);
        libc::syscall(libc::SYS_kill, me, libc::SIGSTOP);
        loop {
            libc::syscall(libc::SYS_pause);
        }
    }
}

/// `syscall` (0f 05) then `int3` (cc).
const CODE: [u8; 3] = [0x0f, 0x05, 0xcc];

/// Where [`MADVISE_EACH`] sits in the code page.
const MADVISE_EACH_AT: u64 = 16;

/// madvise(start, len, edx = advice) over a list of (start, len) pairs at
/// rbx, r12 of them; stops at the first failure (rax the error, rbx at
/// its pair). rdx is reloaded from r13 each time (the call clobbers only
/// rax, rcx and r11).
///
/// ```text
///  0  48 8b 3b        mov rdi, [rbx]
///  3  48 8b 73 08     mov rsi, [rbx+8]
///  7  4c 89 ea        mov rdx, r13
/// 10  b8 1c 00 00 00  mov eax, 28          ; SYS_madvise
/// 15  0f 05           syscall
/// 17  48 85 c0        test rax, rax
/// 20  75 09           jnz 31
/// 22  48 83 c3 10     add rbx, 16
/// 26  49 ff cc        dec r12
/// 29  75 e1           jnz 0
/// 31  cc              int3
/// ```
const MADVISE_EACH: [u8; 32] = [
    0x48, 0x8b, 0x3b, 0x48, 0x8b, 0x73, 0x08, 0x4c, 0x89, 0xea, 0xb8, 0x1c, 0x00, 0x00, 0x00, 0x0f,
    0x05, 0x48, 0x85, 0xc0, 0x75, 0x09, 0x48, 0x83, 0xc3, 0x10, 0x49, 0xff, 0xcc, 0x75, 0xe1, 0xcc,
];

pub struct Child {
    pub pid: i32,
    /// Thread ids, the main thread first.
    pub threads: Vec<i32>,
    /// Address of `syscall; int3` in the child (0 before the code page).
    code: u64,
    /// Registers the injected calls start from.
    template: libc::user_regs_struct,
    mem: File,
    released: bool,
    _not_send: PhantomData<*const ()>,
}

fn perr(op: &str) -> impl Fn(nix::errno::Errno) -> String + '_ {
    move |e| format!("ptrace {op} on the restored process: {e}")
}

impl Child {
    /// Fork a child that stops itself under our ptrace; with `pid`, the
    /// child gets that pid (clone3 set_tid) or this fails.
    pub fn spawn(pid: Option<i32>) -> Result<Child, String> {
        let pid = match pid {
            None => {
                // SAFETY: fork has no preconditions; the child runs
                // `stop_here` only.
                unsafe { libc::fork() as i64 }
            }
            Some(want) => {
                let tid = [want];
                let args = clone_args(0, libc::SIGCHLD as u64, &tid);
                // SAFETY: clone3 without CLONE_VM is a fork; the child runs
                // `stop_here` only.
                unsafe { libc::syscall(libc::SYS_clone3, args.as_ptr(), args.len() * 8) }
            }
        };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EEXIST) => "its pid is in use here (--same-pid needs it free)".into(),
                Some(libc::EPERM) => {
                    "choosing the pid needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN".into()
                }
                _ => format!("fork: {e}"),
            });
        }
        if pid == 0 {
            stop_here();
        }
        let pid = pid as i32;
        let p = Pid::from_raw(pid);
        let kill = || {
            let _ = nix::sys::signal::kill(p, Signal::SIGKILL);
            let _ = waitpid(p, Some(WaitPidFlag::__WALL));
        };
        match waitpid(p, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => {}
            other => {
                kill();
                return Err(format!("the restore child did not stop: {other:?}"));
            }
        }
        let setup = || -> Result<(libc::user_regs_struct, File), String> {
            ptrace::setoptions(
                p,
                ptrace::Options::PTRACE_O_TRACECLONE | ptrace::Options::PTRACE_O_EXITKILL,
            )
            .map_err(perr("setoptions"))?;
            let regs = ptrace::getregs(p).map_err(perr("getregs"))?;
            let mem = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{pid}/mem"))
                .map_err(|e| format!("/proc/{pid}/mem: {e}"))?;
            Ok((regs, mem))
        };
        let (template, mem) = match setup() {
            Ok(x) => x,
            Err(e) => {
                kill();
                return Err(e);
            }
        };
        Ok(Child {
            pid,
            threads: vec![pid],
            code: 0,
            template,
            mem,
            released: false,
            _not_send: PhantomData,
        })
    }

    /// Write bytes into the child's memory (any protection).
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), String> {
        self.mem
            .write_all_at(bytes, addr)
            .map_err(|e| format!("writing {} bytes at {addr:#x}: {e}", bytes.len()))
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        self.mem
            .read_exact_at(buf, addr)
            .map_err(|e| format!("reading {} bytes at {addr:#x}: {e}", buf.len()))
    }

    /// Map the code page at `addr` (the first page `syscall; int3`; the
    /// rest of `len` scratch) using the child's own code for that one call.
    pub fn map_code(&mut self, addr: u64, len: u64) -> Result<(), String> {
        let t = Pid::from_raw(self.pid);
        let rip = self.template.rip & !7;
        let word = ptrace::read(t, rip as _).map_err(perr("peek"))?;
        let mut b = (word as u64).to_le_bytes();
        b[..3].copy_from_slice(&CODE);
        ptrace::write(t, rip as _, i64::from_le_bytes(b) as _).map_err(perr("poke"))?;
        self.code = rip;
        let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
        let r = self.call(
            self.pid,
            libc::SYS_mmap,
            [addr, len, prot, flags, u64::MAX, 0],
        );
        let _ = ptrace::write(t, rip as _, word);
        let got = r?;
        if got as u64 != addr {
            return Err(format!("code page mapped at {got:#x}, not {addr:#x}"));
        }
        self.write(addr, &CODE)?;
        self.code = addr;
        Ok(())
    }

    /// Run system call `nr` in thread `tid`; a negative errno is an Err.
    pub fn call(&mut self, tid: i32, nr: i64, args: [u64; 6]) -> Result<i64, String> {
        let r = self.call_raw(tid, nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(format!("{}", std::io::Error::from_raw_os_error(-r as i32)));
        }
        Ok(r)
    }

    /// As [`Child::call`], the raw result.
    pub fn call_raw(&mut self, tid: i32, nr: i64, args: [u64; 6]) -> Result<i64, String> {
        let regs = syscall_regs(self.template, self.code, nr, args);
        let after = self.run_to_trap(tid, regs)?;
        if after.rip != self.code + 3 {
            return Err(format!("injected call trapped at {:#x}", after.rip));
        }
        Ok(after.rax as i64)
    }

    /// Let thread `tid` run from `regs` until it traps (the int3 after
    /// the injected code); threads it clones meanwhile are recorded.
    /// Returns its registers then.
    fn run_to_trap(
        &mut self,
        tid: i32,
        regs: libc::user_regs_struct,
    ) -> Result<libc::user_regs_struct, String> {
        let t = Pid::from_raw(tid);
        ptrace::setregs(t, regs).map_err(perr("setregs"))?;
        ptrace::cont(t, None).map_err(perr("cont"))?;
        loop {
            match waitpid(t, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => break,
                Ok(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_CLONE => {
                    let new = ptrace::getevent(t).map_err(perr("getevent"))? as i32;
                    self.threads.push(new);
                    ptrace::cont(t, None).map_err(perr("cont"))?;
                }
                Ok(WaitStatus::Stopped(_, sig)) => {
                    return Err(format!("the restored process got {sig} while being built"));
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                    return Err("the restored process died while being built".into());
                }
                Err(nix::errno::Errno::EINTR) | Ok(_) => {}
                Err(e) => return Err(perr("wait")(e)),
            }
        }
        ptrace::getregs(t).map_err(perr("getregs"))
    }

    /// madvise(`advice`) over `count` (start, len) pairs of u64 at `list`
    /// in the child, in one stop: the child runs [`MADVISE_EACH`] from its
    /// code page.
    pub fn madvise_each(&mut self, list: u64, count: usize, advice: i32) -> Result<(), String> {
        if count == 0 {
            return Ok(());
        }
        let at = self.code + MADVISE_EACH_AT;
        self.write(at, &MADVISE_EACH)?;
        let mut regs = self.template;
        regs.rip = at;
        regs.rbx = list;
        regs.r12 = count as u64;
        regs.r13 = advice as u64;
        let after = self.run_to_trap(self.pid, regs)?;
        if after.rip != at + MADVISE_EACH.len() as u64 {
            return Err(format!("the madvise loop trapped at {:#x}", after.rip));
        }
        if after.rax != 0 {
            let e = std::io::Error::from_raw_os_error(-(after.rax as i64) as i32);
            let mut pair = [0u8; 16];
            self.read(after.rbx, &mut pair)?;
            let start = u64::from_le_bytes(pair[..8].try_into().expect("8 bytes"));
            return Err(format!("madvise at {start:#x}: {e}"));
        }
        Ok(())
    }

    /// MADV_DONTNEED over `ranges` (start, end), made by the child itself:
    /// the kernel takes that advice from process_madvise only for the
    /// caller's own memory. One process_madvise per batch of ranges (Linux
    /// 6.13+), else a loop of madvise calls ([`Child::madvise_each`]); the
    /// batches go through `scratch` (`scratch_len` bytes).
    pub fn dont_need(
        &mut self,
        scratch: u64,
        scratch_len: usize,
        ranges: &[(u64, u64)],
    ) -> Result<(), String> {
        if ranges.is_empty() {
            return Ok(());
        }
        let pid = self.pid;
        let me = self.call(pid, libc::SYS_getpid, [0; 6])? as u64;
        let pidfd = self
            .call(pid, libc::SYS_pidfd_open, [me, 0, 0, 0, 0, 0])
            .ok();
        let mut vectored = pidfd.is_some();
        let r = (|| {
            for batch in ranges.chunks(scratch_len / 16) {
                // struct iovec: start, length.
                let list: Vec<u8> = batch
                    .iter()
                    .flat_map(|&(s, e)| s.to_le_bytes().into_iter().chain((e - s).to_le_bytes()))
                    .collect();
                self.write(scratch, &list)?;
                // One call advises at most ~2 GiB (and stops at an error):
                // a short count means the rest is done one range at a time.
                let total: u64 = batch.iter().map(|&(s, e)| e - s).sum();
                if let (true, Some(fd)) = (vectored, pidfd) {
                    let advice = libc::MADV_DONTNEED as u64;
                    let args = [fd as u64, scratch, batch.len() as u64, advice, 0, 0];
                    match self.call_raw(pid, libc::SYS_process_madvise, args)? {
                        r if r >= 0 && r as u64 == total => continue,
                        r if r >= 0 => {}
                        r if r == -(libc::EINVAL as i64) => vectored = false,
                        r => {
                            let e = std::io::Error::from_raw_os_error(-r as i32);
                            return Err(format!("process_madvise: {e}"));
                        }
                    }
                }
                self.madvise_each(scratch, batch.len(), libc::MADV_DONTNEED)?;
            }
            Ok(())
        })();
        if let Some(fd) = pidfd {
            self.call(pid, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        }
        r
    }

    /// Create a thread (it starts stopped, auto-attached); returns its id.
    /// With `want`, it gets that thread id (clone3 set_tid); `scratch` is
    /// where the clone3 arguments are put in the child.
    pub fn clone_thread(&mut self, want: Option<i32>, scratch: u64) -> Result<i32, String> {
        let flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM) as u64;
        let before = self.threads.len();
        let tid = match want {
            None => self.call(self.pid, libc::SYS_clone, [flags, 0, 0, 0, 0, 0])?,
            Some(t) => {
                let mut a = clone_args(flags, 0, &[0]);
                a[8] = scratch + 8 * 11;
                let mut b: Vec<u8> = a.iter().flat_map(|w| w.to_le_bytes()).collect();
                b.extend_from_slice(&t.to_le_bytes());
                self.write(scratch, &b)?;
                self.call(self.pid, libc::SYS_clone3, [scratch, 88, 0, 0, 0, 0])
                    .map_err(|e| format!("thread id {t}: {e}"))?
            }
        } as i32;
        if self.threads.len() == before {
            self.threads.push(tid);
        }
        let t = Pid::from_raw(tid);
        loop {
            match waitpid(t, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Stopped(_, _)) | Ok(WaitStatus::PtraceEvent(..)) => break,
                Err(nix::errno::Errno::EINTR) => {}
                other => return Err(format!("new thread {tid} did not stop: {other:?}")),
            }
        }
        Ok(tid)
    }

    /// Unmap the code page: the last call, which cannot trap at its int3
    /// (the page is gone) and faults instead; the fault is not delivered.
    pub fn unmap_code(&mut self, len: u64) -> Result<(), String> {
        let t = Pid::from_raw(self.pid);
        let args = [self.code, len, 0, 0, 0, 0];
        let regs = syscall_regs(self.template, self.code, libc::SYS_munmap, args);
        ptrace::setregs(t, regs).map_err(perr("setregs"))?;
        ptrace::cont(t, None).map_err(perr("cont"))?;
        loop {
            match waitpid(t, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Stopped(_, Signal::SIGSEGV)) => break,
                Ok(WaitStatus::Stopped(_, sig)) => {
                    return Err(format!("unmapping the code page: stopped by {sig}"))
                }
                Err(nix::errno::Errno::EINTR) | Ok(WaitStatus::PtraceEvent(..)) => {}
                other => return Err(format!("unmapping the code page: {other:?}")),
            }
        }
        let after = ptrace::getregs(t).map_err(perr("getregs"))?;
        if after.rax != 0 {
            return Err(format!("munmap of the code page: {}", after.rax as i64));
        }
        Ok(())
    }

    /// Give thread `tid` its final registers, FP state and signal mask.
    pub fn set_thread(
        &self,
        tid: i32,
        regs: &[u64],
        xstate: &[u8],
        sigmask: u64,
    ) -> Result<(), String> {
        let r = sys::words_to_regs(regs)?;
        if !xstate.is_empty() {
            sys::set_xstate(tid, xstate)?;
        }
        sys::set_sigmask(tid, sigmask)?;
        ptrace::setregs(Pid::from_raw(tid), r).map_err(perr("setregs"))
    }

    /// Let every thread run (detach without a signal).
    pub fn release(mut self) -> Result<i32, String> {
        self.released = true;
        for &tid in self.threads.iter().rev() {
            ptrace::detach(Pid::from_raw(tid), None).map_err(perr("detach"))?;
        }
        Ok(self.pid)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.released {
            let p = Pid::from_raw(self.pid);
            let _ = nix::sys::signal::kill(p, Signal::SIGKILL);
            let _ = waitpid(p, Some(WaitPidFlag::__WALL));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The madvise loop drops exactly the listed pages, and names the
    /// first range it fails on.
    #[test]
    fn madvise_each_drops_the_listed_pages() {
        let mut c = Child::spawn(None).expect("spawn");
        let code = 0x3e00_0000_0000u64;
        c.map_code(code, 4 * 4096).expect("code page");
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let pid = c.pid;
        let mem = c
            .call(pid, libc::SYS_mmap, [0, 8 * 4096, rw, flags, u64::MAX, 0])
            .expect("mmap") as u64;
        c.write(mem, &[7u8; 8 * 4096]).expect("fill");
        // Pages 1 and 4-5.
        let list: Vec<u8> = [(mem + 4096, 4096u64), (mem + 4 * 4096, 2 * 4096)]
            .iter()
            .flat_map(|&(s, l)| s.to_le_bytes().into_iter().chain(l.to_le_bytes()))
            .collect();
        c.write(code + 4096, &list).expect("list");
        c.madvise_each(code + 4096, 2, libc::MADV_DONTNEED)
            .expect("madvise loop");
        let mut back = vec![0u8; 8 * 4096];
        c.read(mem, &mut back).expect("read");
        for (i, page) in back.chunks(4096).enumerate() {
            let zero = matches!(i, 1 | 4 | 5);
            assert!(
                page.iter().all(|&b| b == if zero { 0 } else { 7 }),
                "page {i}"
            );
        }
        // An unaligned start fails, and the error names it.
        let bad: Vec<u8> = [(mem + 1, 4096u64)]
            .iter()
            .flat_map(|&(s, l)| s.to_le_bytes().into_iter().chain(l.to_le_bytes()))
            .collect();
        c.write(code + 4096, &bad).expect("list");
        let e = c
            .madvise_each(code + 4096, 1, libc::MADV_DONTNEED)
            .unwrap_err();
        assert!(e.contains(&format!("{:#x}", mem + 1)), "{e}");
    }
}
