//! Restore, descriptors: each recreated at its number (files reopened,
//! pipes with their data, eventfd, epoll, timerfd, signalfd, listening
//! sockets bound again, connected ones as sockets whose peer closed).

use std::os::fd::AsRawFd;

use super::build::{Builder, RestoreOptions};
use super::state::*;

impl Builder<'_> {
    /// Open `path` in the child with `flags`; returns the new fd.
    pub(super) fn open(&mut self, path: &str, flags: i32) -> Result<u64, String> {
        let p = self.put_str(path, 0)?;
        Ok(self.call(
            libc::SYS_openat,
            [libc::AT_FDCWD as u64, p, flags as u64, 0o644, 0, 0],
            &format!("opening {path}"),
        )? as u64)
    }

    /// Move a fresh descriptor above every target number.
    pub(super) fn park(&mut self, fd: u64) -> Result<u64, String> {
        let parked = self.call(
            libc::SYS_fcntl,
            [fd, libc::F_DUPFD as u64, self.park_at, 0, 0, 0],
            "fcntl(F_DUPFD)",
        )? as u64;
        self.call(libc::SYS_close, [fd, 0, 0, 0, 0, 0], "close")?;
        Ok(parked)
    }

    pub(super) fn fds(&mut self, opts: &RestoreOptions) -> Result<(), String> {
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

    pub(super) fn listen(
        &mut self,
        fd: i32,
        domain: i32,
        addr: &[u8],
        backlog: i32,
    ) -> Result<u64, String> {
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
    pub(super) fn fd_contents(&mut self) -> Result<(), String> {
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
