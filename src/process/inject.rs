//! Running one system call inside a stopped target (x86-64).
//!
//! The thread's registers and the 8 bytes of code we overwrite are saved,
//! `syscall; int3` is written at an 8-byte aligned address of the code the
//! thread is stopped in, the registers are set for the call, the thread runs
//! until the int3 traps, and the code word and registers are put back
//! exactly. `orig_rax` is set to -1 for the injected run so that a system
//! call the thread was blocked in (nanosleep, read, ...) is neither
//! restarted into our call nor lost: restoring the saved registers restores
//! its pending restart.

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::{Attachment, ProcessError};

/// `syscall` (0f 05) followed by `int3` (cc).
const SYSCALL_INT3: [u8; 3] = [0x0f, 0x05, 0xcc];

/// `base` set up to run system call `nr` with `args` from the
/// `syscall` instruction at `at`: orig_rax -1 (no restart of a call the
/// thread was in), no single-step flag.
#[cfg(target_arch = "x86_64")]
pub(crate) fn syscall_regs(
    base: libc::user_regs_struct,
    at: u64,
    nr: i64,
    args: [u64; 6],
) -> libc::user_regs_struct {
    let mut regs = base;
    regs.rax = nr as u64;
    regs.rdi = args[0];
    regs.rsi = args[1];
    regs.rdx = args[2];
    regs.r10 = args[3];
    regs.r8 = args[4];
    regs.r9 = args[5];
    regs.rip = at;
    regs.orig_rax = u64::MAX;
    regs.eflags &= !0x100;
    regs
}

impl Attachment {
    /// Run system call `nr` with `args` in the stopped thread `tid` of the
    /// target and return its raw result (a negative errno on failure).
    #[cfg(target_arch = "x86_64")]
    pub fn inject_syscall(
        &mut self,
        tid: i32,
        nr: i64,
        args: [u64; 6],
    ) -> Result<i64, ProcessError> {
        let pid = self.pid();
        let t = Pid::from_raw(tid);
        let err = |op: &'static str| move |errno: Errno| ProcessError::Ptrace { pid, op, errno };
        if !self.is_stopped(tid) {
            return Err(ProcessError::Ptrace {
                pid,
                op: "inject (thread not stopped)",
                errno: Errno::ESRCH,
            });
        }
        let saved = ptrace::getregs(t).map_err(err("getregs"))?;
        let addr = saved.rip & !7;
        let word = ptrace::read(t, addr as ptrace::AddressType).map_err(err("peek code"))?;
        let mut code = (word as u64).to_le_bytes();
        code[..3].copy_from_slice(&SYSCALL_INT3);
        let regs = syscall_regs(saved, addr, nr, args);
        ptrace::write(
            t,
            addr as ptrace::AddressType,
            i64::from_le_bytes(code) as libc::c_long,
        )
        .map_err(err("poke code"))?;
        let run = (|| {
            ptrace::setregs(t, regs).map_err(err("setregs"))?;
            ptrace::cont(t, None).map_err(err("cont"))?;
            loop {
                match waitpid(t, Some(WaitPidFlag::__WALL)) {
                    Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => break,
                    Ok(WaitStatus::Stopped(_, sig)) => {
                        // A signal arrived meanwhile: keep it for later and
                        // let the call finish.
                        self.remember_signal(tid, sig);
                        ptrace::cont(t, None).map_err(err("cont"))?;
                    }
                    Ok(WaitStatus::PtraceEvent(..)) => {
                        ptrace::cont(t, None).map_err(err("cont"))?;
                    }
                    Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                        return Err(ProcessError::Exited { pid });
                    }
                    Err(Errno::EINTR) | Ok(_) => {}
                    Err(e) => return Err(err("wait")(e)),
                }
            }
            let after = ptrace::getregs(t).map_err(err("getregs"))?;
            if after.rip != addr + 3 {
                return Err(ProcessError::Ptrace {
                    pid,
                    op: "inject (trapped at an unexpected address)",
                    errno: Errno::EFAULT,
                });
            }
            Ok(after.rax as i64)
        })();
        // Put everything back, whatever happened.
        let restored = ptrace::write(t, addr as ptrace::AddressType, word)
            .and_then(|_| ptrace::setregs(t, saved))
            .map_err(err("restore"));
        let result = run?;
        restored?;
        Ok(result)
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn inject_syscall(
        &mut self,
        _tid: i32,
        _nr: i64,
        _args: [u64; 6],
    ) -> Result<i64, ProcessError> {
        Err(ProcessError::Ptrace {
            pid: self.pid(),
            op: "inject (only implemented on x86-64)",
            errno: Errno::ENOSYS,
        })
    }

    /// Inject `close(fd)` into the target.
    pub fn close_remote_fd(&mut self, tid: i32, fd: i32) -> Result<(), ProcessError> {
        let r = self.inject_syscall(tid, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        if r < 0 {
            return Err(ProcessError::Remote {
                pid: self.pid(),
                call: "close",
                errno: Errno::from_raw(-r as i32),
            });
        }
        Ok(())
    }
}
