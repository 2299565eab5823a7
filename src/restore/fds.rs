//! A process's file descriptors, from /proc/PID/fd and fdinfo: what each
//! is, whether restore can recreate it, and the state it needs.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::state::{FdKind, FdState};
use crate::process::take_remote_fd;

/// The fds of `pid`, and one line per fd restore cannot recreate.
/// Pipe contents are read without consuming them (tee), so this is safe on
/// a running process; they are exact only once it is stopped.
pub fn read_fds(pid: i32) -> Result<(Vec<FdState>, Vec<String>), String> {
    let dir = format!("/proc/{pid}/fd");
    let mut nums: Vec<i32> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot list {dir}: {e}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    nums.sort_unstable();
    let mut out = Vec::new();
    let mut refused = Vec::new();
    // Pipes: inode -> (has read end, has write end).
    let mut pipes: BTreeMap<u64, (bool, bool)> = BTreeMap::new();
    let mut raw = Vec::new();
    for fd in nums {
        let Ok(link) = std::fs::read_link(format!("{dir}/{fd}")) else {
            continue; // closed meanwhile
        };
        let link = link.to_string_lossy().into_owned();
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        let flags = field(&info, "flags:").and_then(|v| u32::from_str_radix(v, 8).ok());
        let flags = flags.unwrap_or(0);
        if let Some(id) = bracketed(&link, "pipe:") {
            let e = pipes.entry(id).or_default();
            if flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32 {
                e.1 = true;
            } else {
                e.0 = true;
            }
        }
        raw.push((fd, link, info, flags));
    }
    let mut pipe_data_taken = BTreeMap::new();
    for (fd, link, info, flags) in raw {
        match classify(pid, fd, &link, &info, flags, &pipes, &mut pipe_data_taken) {
            Ok(kind) => out.push(FdState { fd, flags, kind }),
            Err(why) => refused.push(format!("fd {fd} ({link}): {why}")),
        }
    }
    Ok((out, refused))
}

fn classify(
    pid: i32,
    fd: i32,
    link: &str,
    info: &str,
    flags: u32,
    pipes: &BTreeMap<u64, (bool, bool)>,
    pipe_data_taken: &mut BTreeMap<u64, ()>,
) -> Result<FdKind, String> {
    let stdio = fd <= 2;
    if let Some(id) = bracketed(link, "pipe:") {
        let (r, w) = pipes[&id];
        if r && w {
            let write_end = flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32;
            let mut data = Vec::new();
            if !write_end && pipe_data_taken.insert(id, ()).is_none() {
                data = pipe_contents(pid, fd)?;
            }
            return Ok(FdKind::Pipe {
                id,
                write_end,
                data,
            });
        }
        if stdio {
            return Ok(FdKind::Stdio {
                what: link.to_string(),
            });
        }
        return Err("a pipe to another process".into());
    }
    if link.starts_with("socket:") {
        return socket(pid, fd, link, stdio);
    }
    if let Some(kind) = link.strip_prefix("anon_inode:") {
        return match kind {
            "[eventfd]" => Ok(FdKind::Eventfd {
                count: field(info, "eventfd-count:")
                    .and_then(|v| u64::from_str_radix(v, 16).ok())
                    .ok_or("no eventfd-count in fdinfo")?,
                semaphore: field(info, "eventfd-semaphore:") == Some("1"),
            }),
            "[eventpoll]" => Ok(FdKind::Epoll {
                targets: epoll_targets(info)?,
            }),
            "[timerfd]" => timerfd(info),
            "[signalfd]" => Ok(FdKind::Signalfd {
                mask: field(info, "sigmask:")
                    .and_then(|v| u64::from_str_radix(v, 16).ok())
                    .ok_or("no sigmask in fdinfo")?,
            }),
            other => Err(format!("{other} descriptors are not restored")),
        };
    }
    if !link.starts_with('/') {
        return Err("a kind of descriptor procmig does not restore".into());
    }
    if link.ends_with(" (deleted)") {
        return Err("its file was deleted".into());
    }
    let tty = is_tty(link);
    if tty && stdio {
        return Ok(FdKind::Stdio {
            what: link.to_string(),
        });
    }
    let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).map_err(|e| e.to_string())?;
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_dir() || ft.is_char_device() || ft.is_block_device()) {
        return Err("not a file, directory or device".into());
    }
    Ok(FdKind::Path {
        path: link.to_string(),
        pos: field(info, "pos:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        tty,
    })
}

fn is_tty(path: &str) -> bool {
    path.starts_with("/dev/pts/") || path.starts_with("/dev/tty") || path == "/dev/console"
}

/// The value after `key` on its line of an fdinfo text.
pub(super) fn field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim())
}

/// `pipe:[123]` -> 123.
fn bracketed(link: &str, prefix: &str) -> Option<u64> {
    link.strip_prefix(prefix)?
        .strip_prefix('[')?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// epoll fdinfo lines: `tfd: 5 events: 19 data: 5 pos:0 ino:...`.
fn epoll_targets(info: &str) -> Result<Vec<[u64; 3]>, String> {
    let mut out = Vec::new();
    for line in info.lines().filter(|l| l.starts_with("tfd:")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |k: &str| {
            words
                .iter()
                .position(|w| *w == k)
                .and_then(|i| words.get(i + 1))
                .copied()
        };
        let tfd = after("tfd:").and_then(|v| v.parse::<u64>().ok());
        let ev = after("events:").and_then(|v| u64::from_str_radix(v, 16).ok());
        let data = after("data:").and_then(|v| u64::from_str_radix(v, 16).ok());
        match (tfd, ev, data) {
            (Some(t), Some(e), Some(d)) => out.push([t, e, d]),
            _ => return Err(format!("cannot parse epoll fdinfo line {line:?}")),
        }
    }
    Ok(out)
}

fn timerfd(info: &str) -> Result<FdKind, String> {
    let pair = |k: &str| -> Option<(i64, i64)> {
        let v = field(info, k)?
            .trim_start_matches('(')
            .trim_end_matches(')');
        let (a, b) = v.split_once(',')?;
        Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
    };
    let clockid = field(info, "clockid:")
        .and_then(|v| v.parse().ok())
        .ok_or("no clockid in timerfd fdinfo")?;
    let (vs, vn) = pair("it_value:").ok_or("no it_value in timerfd fdinfo")?;
    let (is, ins) = pair("it_interval:").ok_or("no it_interval in timerfd fdinfo")?;
    let ticks: u64 = field(info, "ticks:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // A timer that has expired but was not read yet shows it_value 0: the
    // kernel re-arms a periodic timerfd only when it is read. Armed again
    // with 0 it would be disarmed for good; 1 ns makes it expire at once
    // (the reader sees its tick) and then go on at its interval. The count
    // of missed expirations itself is not restored (at least one is).
    let (vs, vn) = if vs == 0 && vn == 0 && (ticks > 0 || is != 0 || ins != 0) {
        (0, 1)
    } else {
        (vs, vn)
    };
    Ok(FdKind::Timerfd {
        clockid,
        times: [is, ins, vs, vn],
    })
}

/// What is buffered in the pipe whose read end is `fd` of `pid`, read with
/// tee(2) so the pipe keeps it.
fn pipe_contents(pid: i32, fd: i32) -> Result<Vec<u8>, String> {
    let theirs = take_remote_fd(pid, fd).map_err(|e| e.to_string())?;
    let mut ends = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptors from pipe2, owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    // Room for a full pipe: the largest a pipe may be made.
    let max: i32 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, max) };
    // SAFETY: tee between two pipe descriptors we hold.
    let n = unsafe {
        libc::tee(
            theirs.as_raw_fd(),
            w.as_raw_fd(),
            usize::MAX >> 1,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(Vec::new()); // empty
        }
        return Err(format!("tee: {e}"));
    }
    let mut data = vec![0u8; n as usize];
    let mut got = 0;
    while got < data.len() {
        // SAFETY: reading into the unfilled tail of our buffer.
        let k = unsafe {
            libc::read(
                r.as_raw_fd(),
                data[got..].as_mut_ptr().cast(),
                data.len() - got,
            )
        };
        if k <= 0 {
            break;
        }
        got += k as usize;
    }
    data.truncate(got);
    Ok(data)
}

fn socket(pid: i32, fd: i32, link: &str, stdio: bool) -> Result<FdKind, String> {
    let s = take_remote_fd(pid, fd).map_err(|e| e.to_string())?;
    let opt = |name: i32| -> Result<i32, String> {
        let mut v: i32 = 0;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int into v.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut i32).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(format!("getsockopt: {}", std::io::Error::last_os_error()));
        }
        Ok(v)
    };
    let domain = opt(libc::SO_DOMAIN)?;
    let ty = opt(libc::SO_TYPE)?;
    let listening = opt(libc::SO_ACCEPTCONN)? != 0;
    let inet = matches!(domain, libc::AF_INET | libc::AF_INET6);
    if !(inet || domain == libc::AF_UNIX) {
        return Err(format!("socket of address family {domain} is not restored"));
    }
    if ty != libc::SOCK_STREAM {
        if stdio {
            return Ok(FdKind::Stdio {
                what: link.to_string(),
            });
        }
        return Err("only stream sockets are restored".into());
    }
    if listening {
        let mut addr = [0u8; 128];
        let mut len = addr.len() as libc::socklen_t;
        // SAFETY: getsockname writes at most len bytes into addr.
        if unsafe { libc::getsockname(s.as_raw_fd(), addr.as_mut_ptr().cast(), &mut len) } < 0 {
            return Err(format!("getsockname: {}", std::io::Error::last_os_error()));
        }
        return Ok(FdKind::Listen {
            domain,
            addr: addr[..len as usize].to_vec(),
            backlog: 4096,
        });
    }
    if stdio {
        return Ok(FdKind::Stdio {
            what: link.to_string(),
        });
    }
    Ok(FdKind::Connected {
        what: link.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_and_timer_fdinfo_parse() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1057\ntfd:        5 events:       19 data:                5  pos:0 ino:4a1 sdev:f\ntfd:        7 events: 80000001 data: ffffffffffffffff  pos:0 ino:4a2 sdev:f\n";
        assert_eq!(
            epoll_targets(info).unwrap(),
            vec![[5, 0x19, 5], [7, 0x8000_0001, u64::MAX]]
        );
        let t = "clockid: 1\nticks: 0\nsettime flags: 00\nit_value: (0, 49406829)\nit_interval: (1, 0)\n";
        assert_eq!(
            timerfd(t).unwrap(),
            FdKind::Timerfd {
                clockid: 1,
                times: [1, 0, 0, 49406829]
            }
        );
        // Expired and not read yet: armed again to expire at once.
        let t = "clockid: 1\nticks: 3\nsettime flags: 00\nit_value: (0, 0)\nit_interval: (0, 20000000)\n";
        assert_eq!(
            timerfd(t).unwrap(),
            FdKind::Timerfd {
                clockid: 1,
                times: [0, 20000000, 0, 1]
            }
        );
        // Disarmed stays disarmed.
        let t = "clockid: 0\nticks: 0\nsettime flags: 00\nit_value: (0, 0)\nit_interval: (0, 0)\n";
        assert_eq!(
            timerfd(t).unwrap(),
            FdKind::Timerfd {
                clockid: 0,
                times: [0; 4]
            }
        );
        assert_eq!(bracketed("pipe:[123]", "pipe:"), Some(123));
    }

    #[test]
    fn an_expired_unread_periodic_timer_is_captured_armed() {
        // SAFETY: test-only plain system calls on a descriptor we own.
        let tfd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, 0) };
        assert!(tfd >= 0);
        let its = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 1_000_000,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: 1_000_000,
            },
        };
        // SAFETY: as above; `its` lives across the call.
        let r = unsafe { libc::timerfd_settime(tfd, 0, &its, std::ptr::null_mut()) };
        assert_eq!(r, 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{tfd}")).unwrap();
        let FdKind::Timerfd { times, .. } = timerfd(&info).unwrap() else {
            unreachable!()
        };
        // SAFETY: as above.
        unsafe { libc::close(tfd) };
        assert_eq!(times[..2], [0, 1_000_000], "{info}");
        assert!(times[2] != 0 || times[3] != 0, "captured disarmed: {info}");
    }

    #[test]
    fn own_pipe_and_eventfd_are_read() {
        let mut p = [0; 2];
        // SAFETY: test-only plain system calls.
        unsafe { libc::pipe(p.as_mut_ptr()) };
        // SAFETY: as above.
        let efd = unsafe { libc::eventfd(7, 0) };
        // SAFETY: as above.
        unsafe { libc::write(p[1], b"hello".as_ptr().cast(), 5) };
        let (fds, _) = read_fds(std::process::id() as i32).unwrap();
        let read_end = fds.iter().find(|f| f.fd == p[0]).unwrap();
        assert!(
            matches!(&read_end.kind, FdKind::Pipe { write_end: false, data, .. } if data == b"hello"),
            "{read_end:?}"
        );
        let e = fds.iter().find(|f| f.fd == efd).unwrap();
        assert_eq!(
            e.kind,
            FdKind::Eventfd {
                count: 7,
                semaphore: false
            }
        );
        // The pipe still holds its data.
        let mut buf = [0u8; 8];
        // SAFETY: as above.
        let n = unsafe { libc::read(p[0], buf.as_mut_ptr().cast(), 8) };
        assert_eq!(&buf[..n as usize], b"hello");
        // SAFETY: as above.
        unsafe {
            libc::close(p[0]);
            libc::close(p[1]);
            libc::close(efd);
        }
    }
}
