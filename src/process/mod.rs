//! The source process: attaching, its memory regions, and reading them.

mod attach;
mod inject;
mod maps;
mod mem;
mod pagemap;
pub mod thp;

pub use attach::{leave_detached, process_state, resume_stopped, Attachment, Leave};
#[cfg(target_arch = "x86_64")]
pub(crate) use inject::syscall_regs;
pub(crate) use maps::path_name;
pub use maps::{
    read_mappings, read_regions, reason, select_regions, summarize, LeftOut, Region, RegionFilter,
    RegionKind,
};
pub use mem::MemReader;
pub use pagemap::{holds_data, Pagemap, PM_PRESENT, PM_SWAPPED};

use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// No such process.
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: i32 },
    /// The process exited while we worked on it.
    #[error("process {pid} exited")]
    Exited { pid: i32 },
    /// `--resume-source` on a process that is not left stopped.
    #[error("process {pid} is not a stopped, untraced process (state {state}); nothing to resume")]
    NotStopped { pid: i32, state: char },
    /// procmig was asked to migrate itself.
    #[error("procmig cannot migrate itself")]
    SelfTarget,
    /// ptrace refused to attach.
    #[error("not permitted to trace process {pid} (ptrace needs the same user and kernel.yama.ptrace_scope=0, or root / CAP_SYS_PTRACE; ptrace_scope here is {scope})")]
    PermissionDenied { pid: i32, scope: String },
    /// Another ptrace request failed.
    #[error("ptrace {op} on process {pid} failed: {errno}")]
    Ptrace {
        pid: i32,
        op: &'static str,
        errno: Errno,
    },
    /// A system call injected into the target failed.
    #[error("{call} inside process {pid} failed: {errno}")]
    Remote {
        pid: i32,
        call: &'static str,
        errno: Errno,
    },
    /// pidfd_open / pidfd_getfd failed.
    #[error("cannot take file descriptor {fd} of process {pid}: {errno}")]
    GetFd { pid: i32, fd: i32, errno: Errno },
    /// /proc/PID/maps could not be read or parsed.
    #[error("cannot read the memory map of process {pid}: {reason}")]
    Maps { pid: i32, reason: String },
    /// A --region filter matched nothing.
    #[error("--region {filter} matches no writable mapping of process {pid}")]
    NoMatch { pid: i32, filter: String },
    /// /proc/PID/pagemap could not be read.
    #[error("cannot read /proc/{pid}/pagemap: {source}")]
    Pagemap { pid: i32, source: std::io::Error },
    /// Memory could not be read.
    #[error("cannot read {len:#x} bytes at {addr:#x} in process {pid}: {source}")]
    Read {
        pid: i32,
        addr: u64,
        len: usize,
        source: std::io::Error,
    },
}

/// The kernel's page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// A pidfd for `pid` (pidfd_open, Linux 5.3+).
pub fn pidfd(pid: i32) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes integers and returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a fresh descriptor, owned from here on.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Duplicate file descriptor `fd` of process `pid` into this process
/// (pidfd_open + pidfd_getfd, Linux 5.6+).
pub fn take_remote_fd(pid: i32, fd: i32) -> Result<std::os::fd::OwnedFd, ProcessError> {
    use std::os::fd::FromRawFd;
    let fail = |errno| ProcessError::GetFd { pid, fd, errno };
    // SAFETY: plain system calls with integer arguments; the returned
    // descriptors are fresh and owned by us.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(fail(Errno::last()));
        }
        let pidfd = std::os::fd::OwnedFd::from_raw_fd(pidfd as i32);
        let ours = libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        );
        if ours < 0 {
            return Err(fail(Errno::last()));
        }
        Ok(std::os::fd::OwnedFd::from_raw_fd(ours as i32))
    }
}

/// Whether process `pid` still exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    matches!(process_state(pid), Ok(s) if s != 'Z' && s != 'X')
}
