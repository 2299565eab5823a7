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
        let t = Pid::from_raw(tid);
        let regs = syscall_regs(self.template, self.code, nr, args);
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
        let after = ptrace::getregs(t).map_err(perr("getregs"))?;
        if after.rip != self.code + 3 {
            return Err(format!("injected call trapped at {:#x}", after.rip));
        }
        Ok(after.rax as i64)
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
