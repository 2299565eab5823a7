//! Attaching to every thread of a process with ptrace, stopping it, and
//! leaving it exactly as it was.
//!
//! All ptrace requests must come from the thread that seized the tracee, so
//! an [`Attachment`] is `!Send` and lives on the thread that created it.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{self, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::ProcessError;

/// How to leave the process when detaching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// As it was before we attached: running, or stopped if it was stopped.
    AsFound,
    /// Stopped (SIGSTOP), whatever it was before; `kill -CONT` resumes it.
    Stopped,
    /// Killed with SIGKILL.
    Killed,
}

#[derive(Debug)]
struct Tracee {
    /// In a ptrace-stop we caused (or a signal-delivery-stop).
    stopped: bool,
    /// Signal intercepted while stopping; re-delivered on detach.
    pending: Option<Signal>,
}

/// Every thread of one process, seized with PTRACE_SEIZE. Dropping it
/// detaches and leaves the process as found, on every exit path.
#[derive(Debug)]
pub struct Attachment {
    pid: Pid,
    threads: BTreeMap<i32, Tracee>,
    was_stopped: bool,
    done: bool,
    _not_send: PhantomData<*const ()>,
}

/// State letter from /proc/PID/stat (R, S, D, T, t, Z, ...).
pub fn process_state(pid: i32) -> Result<char, ProcessError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|_| ProcessError::NoSuchProcess { pid })?;
    // The command name is in parentheses and may contain anything.
    let after = stat.rfind(')').map(|i| &stat[i + 1..]).unwrap_or("");
    after
        .split_whitespace()
        .next()
        .and_then(|s| s.chars().next())
        .ok_or(ProcessError::NoSuchProcess { pid })
}

fn list_threads(pid: i32) -> Result<Vec<i32>, ProcessError> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|_| ProcessError::NoSuchProcess { pid })?;
    let mut tids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

fn ptrace_scope() -> String {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "absent".into())
}

impl Attachment {
    /// Seize every thread of `pid` without stopping it.
    pub fn seize(pid: i32) -> Result<Attachment, ProcessError> {
        if pid <= 0 {
            return Err(ProcessError::NoSuchProcess { pid });
        }
        if pid as u32 == std::process::id() {
            return Err(ProcessError::SelfTarget);
        }
        let state = process_state(pid)?;
        if state == 'Z' || state == 'X' {
            return Err(ProcessError::Exited { pid });
        }
        let mut a = Attachment {
            pid: Pid::from_raw(pid),
            threads: BTreeMap::new(),
            was_stopped: state == 'T',
            done: false,
            _not_send: PhantomData,
        };
        a.seize_new_threads()?;
        if a.threads.is_empty() {
            return Err(ProcessError::Exited { pid });
        }
        Ok(a)
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Whether thread `tid` is seized and in a ptrace-stop.
    pub fn is_stopped(&self, tid: i32) -> bool {
        self.threads.get(&tid).is_some_and(|t| t.stopped)
    }

    /// Seized thread ids, main thread first when alive.
    pub fn tids(&self) -> Vec<i32> {
        let pid = self.pid.as_raw();
        let mut v: Vec<i32> = self.threads.keys().copied().collect();
        v.sort_by_key(|&t| (t != pid, t));
        v
    }

    /// Keep a signal intercepted while the thread ran for us; it is
    /// delivered on detach.
    pub(super) fn remember_signal(&mut self, tid: i32, sig: Signal) {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.pending.get_or_insert(sig);
        }
    }

    /// Number of threads currently seized.
    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    /// Seize threads not seized yet; returns how many were new.
    fn seize_new_threads(&mut self) -> Result<usize, ProcessError> {
        let pid = self.pid.as_raw();
        let mut new = 0;
        for tid in list_threads(pid)? {
            if self.threads.contains_key(&tid) {
                continue;
            }
            match ptrace::seize(Pid::from_raw(tid), ptrace::Options::empty()) {
                Ok(()) => {
                    self.threads.insert(
                        tid,
                        Tracee {
                            stopped: false,
                            pending: None,
                        },
                    );
                    new += 1;
                }
                // The thread exited between listing and seizing.
                Err(Errno::ESRCH) if tid != pid => {}
                Err(Errno::ESRCH) => return Err(ProcessError::Exited { pid }),
                Err(Errno::EPERM) => {
                    return Err(ProcessError::PermissionDenied {
                        pid,
                        scope: ptrace_scope(),
                    })
                }
                Err(e) => {
                    return Err(ProcessError::Ptrace {
                        pid,
                        op: "seize",
                        errno: e,
                    })
                }
            }
        }
        Ok(new)
    }

    /// Stop every thread (PTRACE_INTERRUPT), including threads created while
    /// stopping: the task list is read again until it no longer changes.
    pub fn stop(&mut self) -> Result<(), ProcessError> {
        loop {
            let tids: Vec<i32> = self
                .threads
                .iter()
                .filter(|(_, t)| !t.stopped)
                .map(|(&tid, _)| tid)
                .collect();
            for &tid in &tids {
                match ptrace::interrupt(Pid::from_raw(tid)) {
                    Ok(()) => {}
                    Err(Errno::ESRCH) => {}
                    Err(e) => {
                        return Err(ProcessError::Ptrace {
                            pid: self.pid.as_raw(),
                            op: "interrupt",
                            errno: e,
                        })
                    }
                }
            }
            for tid in tids {
                self.wait_stopped(tid)?;
            }
            if self.seize_new_threads()? == 0 {
                return Ok(());
            }
        }
    }

    /// Wait until `tid` reports a stop; forget it if it exited.
    fn wait_stopped(&mut self, tid: i32) -> Result<(), ProcessError> {
        let pid = self.pid.as_raw();
        loop {
            match waitpid(Pid::from_raw(tid), Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::PtraceEvent(_, _, _)) => break,
                Ok(WaitStatus::Stopped(_, sig)) => {
                    // A signal arrived before our interrupt: keep it for
                    // detach. The thread is in a ptrace-stop now.
                    if let Some(t) = self.threads.get_mut(&tid) {
                        t.pending = Some(sig);
                    }
                    break;
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                    self.threads.remove(&tid);
                    if tid == pid || self.threads.is_empty() {
                        return Err(ProcessError::Exited { pid });
                    }
                    return Ok(());
                }
                Err(Errno::EINTR) => continue,
                Ok(_) => continue,
                Err(e) => {
                    return Err(ProcessError::Ptrace {
                        pid,
                        op: "wait",
                        errno: e,
                    })
                }
            }
        }
        if let Some(t) = self.threads.get_mut(&tid) {
            t.stopped = true;
        }
        Ok(())
    }

    /// Whether the process was stopped (group-stop) when attached.
    pub fn was_stopped(&self) -> bool {
        self.was_stopped
    }

    /// Detach from every thread and leave the process as asked.
    pub fn detach(mut self, leave: Leave) -> Result<(), ProcessError> {
        self.release(leave)
    }

    fn release(&mut self, leave: Leave) -> Result<(), ProcessError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let pid = self.pid;
        if leave == Leave::Killed {
            return match signal::kill(pid, Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => Ok(()),
                Err(e) => Err(ProcessError::Ptrace {
                    pid: pid.as_raw(),
                    op: "kill",
                    errno: e,
                }),
            };
        }
        // PTRACE_DETACH needs a stopped tracee.
        let running: Vec<i32> = self
            .threads
            .iter()
            .filter(|(_, t)| !t.stopped)
            .map(|(&tid, _)| tid)
            .collect();
        for tid in running {
            if ptrace::interrupt(Pid::from_raw(tid)).is_ok() {
                let _ = self.wait_stopped(tid);
            }
        }
        // A SIGSTOP queued while every thread is in a ptrace-stop is taken
        // right after detach, putting the whole process in group-stop.
        if leave == Leave::Stopped || self.was_stopped {
            let _ = signal::kill(pid, Signal::SIGSTOP);
        }
        for (&tid, t) in &self.threads {
            let _ = ptrace::detach(Pid::from_raw(tid), t.pending);
        }
        self.threads.clear();
        if leave == Leave::Stopped || self.was_stopped {
            // Detached threads re-enter the group-stop on their own, inside
            // the kernel; wait for it so that callers see a stopped process.
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_secs(2) {
                match process_state(pid.as_raw()) {
                    Ok('T') | Err(_) => break,
                    _ => std::thread::sleep(std::time::Duration::from_millis(1)),
                }
            }
        }
        Ok(())
    }
}

/// `send --resume-source`: let a process left stopped by a migration run
/// again. It must be stopped (group-stop) and not traced.
pub fn resume_stopped(pid: i32) -> Result<(), ProcessError> {
    let state = process_state(pid)?;
    if state != 'T' {
        return Err(ProcessError::NotStopped { pid, state });
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| ProcessError::NoSuchProcess { pid })?;
    let tracer = status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .map(str::trim)
        .unwrap_or("0");
    if tracer != "0" {
        return Err(ProcessError::NotStopped { pid, state: 't' });
    }
    signal::kill(Pid::from_raw(pid), Signal::SIGCONT).map_err(|e| ProcessError::Ptrace {
        pid,
        op: "kill -CONT",
        errno: e,
    })?;
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(2) {
        if process_state(pid).is_ok_and(|s| s != 'T') {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(())
}

/// Leave a process that was detached in group-stop ([`Leave::Stopped`])
/// as asked: stopped, killed, or running again unless it was stopped when
/// found. Best effort: a process that is gone needs nothing.
pub fn leave_detached(pid: i32, leave: Leave, was_stopped: bool) {
    let pid = Pid::from_raw(pid);
    match leave {
        Leave::Stopped => {}
        Leave::Killed => {
            let _ = signal::kill(pid, Signal::SIGKILL);
        }
        Leave::AsFound if !was_stopped => {
            let _ = signal::kill(pid, Signal::SIGCONT);
        }
        Leave::AsFound => {}
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = self.release(Leave::AsFound);
    }
}
