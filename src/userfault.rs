//! userfaultfd in MISSING mode, for post-copy: the ioctls, and the events
//! a monitor reads (the write-protect side, for dirty tracking, is in
//! `dirty::uffd`).

use std::io;

use crate::dirty::uffd::{enable, ioctl, register, UffdioRange};

pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const REGISTER_MODE_MISSING: u64 = 1;

pub const EVENT_PAGEFAULT: u8 = 0x12;
pub const EVENT_FORK: u8 = 0x13;
pub const EVENT_REMAP: u8 = 0x14;
pub const EVENT_REMOVE: u8 = 0x15;
pub const EVENT_UNMAP: u8 = 0x16;

const fn ioc(dir: u64, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAA << 8) | nr as u64
}
const UFFDIO_WAKE: u64 = ioc(2, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(3, 0x03, 40);
const UFFDIO_ZEROPAGE: u64 = ioc(3, 0x04, 32);
const _: () = assert!(UFFDIO_COPY == 0xC028AA03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xC020AA04);
const _: () = assert!(UFFDIO_WAKE == 0x8010AA02);

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// UFFDIO_API for MISSING faults with the fork, remove, unmap and remap
/// events: a child forked meanwhile gets a userfaultfd of its own, and a
/// page the process drops must read as zero afterwards, not as the data
/// that arrives later.
pub fn enable_missing(fd: i32) -> io::Result<()> {
    enable(
        fd,
        FEATURE_EVENT_FORK | FEATURE_EVENT_REMAP | FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP,
    )
}

pub fn register_missing(fd: i32, start: u64, len: u64) -> io::Result<()> {
    register(fd, start, len, REGISTER_MODE_MISSING)
}

/// What a fill of missing pages found.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled {
    Done,
    /// The page was there already (filled earlier): waiters were woken.
    Exists,
    /// The range is no longer mapped.
    Gone,
    /// The process is gone.
    Exited,
    /// The layout is changing (an event is pending): try again once the
    /// monitor has read it.
    Again,
}

fn filled(r: io::Result<i64>, fd: i32, start: u64, len: u64) -> io::Result<Filled> {
    match r {
        Ok(_) => Ok(Filled::Done),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            wake(fd, start, len)?;
            Ok(Filled::Exists)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Filled::Gone),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(Filled::Exited),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(Filled::Again),
        Err(e) => Err(e),
    }
}

/// Copy `data` into the missing pages at `dst` and wake the threads
/// waiting on them.
pub fn copy(fd: i32, dst: u64, data: &[u8]) -> io::Result<Filled> {
    let mut c = UffdioCopy {
        dst,
        src: data.as_ptr() as u64,
        len: data.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: UffdioCopy is the UFFDIO_COPY argument; `src` points to
    // `len` readable bytes of ours.
    let r = unsafe { ioctl(fd, UFFDIO_COPY, &mut c) };
    filled(r, fd, dst, data.len() as u64)
}

/// Map the zero page at the missing pages `[start, start+len)` and wake.
pub fn zeropage(fd: i32, start: u64, len: u64) -> io::Result<Filled> {
    let mut z = UffdioZeropage {
        range: UffdioRange { start, len },
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: UffdioZeropage is the UFFDIO_ZEROPAGE argument.
    let r = unsafe { ioctl(fd, UFFDIO_ZEROPAGE, &mut z) };
    filled(r, fd, start, len)
}

pub fn wake(fd: i32, start: u64, len: u64) -> io::Result<()> {
    let mut range = UffdioRange { start, len };
    // SAFETY: UffdioRange is the UFFDIO_WAKE argument.
    unsafe { ioctl(fd, UFFDIO_WAKE, &mut range) }.map(drop)
}

/// One event read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Fault {
        addr: u64,
    },
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    /// A child was forked; `ufd` is a new descriptor in this process for
    /// its userfaultfd.
    Fork {
        ufd: i32,
    },
    Other(u8),
}

/// Read the events that are ready (the fd is non-blocking).
pub fn read_events(fd: i32, out: &mut Vec<Event>) -> io::Result<()> {
    let mut buf = [0u8; 32 * 64];
    loop {
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(()),
                Some(libc::EINTR) => continue,
                _ => Err(e),
            };
        }
        if n == 0 {
            return Ok(());
        }
        for m in buf[..n as usize].chunks_exact(32) {
            let w = |i: usize| u64::from_le_bytes(m[8 + 8 * i..16 + 8 * i].try_into().expect("8"));
            out.push(match m[0] {
                EVENT_PAGEFAULT => Event::Fault { addr: w(1) },
                EVENT_REMOVE => Event::Remove {
                    start: w(0),
                    end: w(1),
                },
                EVENT_UNMAP => Event::Unmap {
                    start: w(0),
                    end: w(1),
                },
                EVENT_REMAP => Event::Remap {
                    from: w(0),
                    to: w(1),
                    len: w(2),
                },
                // uffd_msg.arg.fork.ufd: a u32 at offset 8.
                EVENT_FORK => Event::Fork {
                    ufd: u32::from_le_bytes(m[8..12].try_into().expect("4")) as i32,
                },
                other => Event::Other(other),
            });
        }
        if (n as usize) < buf.len() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events as the kernel lays them out (struct uffd_msg, 32 bytes),
    /// read from a pipe: a fork's descriptor is not lost among "other".
    #[test]
    fn events_are_parsed_by_kind() {
        let mut fds = [0; 2];
        assert_eq!(
            // SAFETY: a pipe of our own.
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) },
            0
        );
        let msg = |kind: u8, words: [u64; 3]| {
            let mut m = [0u8; 32];
            m[0] = kind;
            for (i, w) in words.iter().enumerate() {
                m[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_le_bytes());
            }
            m
        };
        let mut bytes = Vec::new();
        bytes.extend(msg(EVENT_PAGEFAULT, [1, 0x7000_1234, 0]));
        bytes.extend(msg(EVENT_FORK, [42, 0, 0]));
        bytes.extend(msg(EVENT_REMAP, [0x1000, 0x9000, 0x2000]));
        bytes.extend(msg(EVENT_REMOVE, [0x1000, 0x3000, 0]));
        bytes.extend(msg(EVENT_UNMAP, [0x5000, 0x6000, 0]));
        bytes.extend(msg(0x77, [0, 0, 0]));
        // SAFETY: writing our buffer to our pipe.
        let n = unsafe { libc::write(fds[1], bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(n as usize, bytes.len());
        let mut got = Vec::new();
        read_events(fds[0], &mut got).unwrap();
        assert_eq!(
            got,
            vec![
                Event::Fault { addr: 0x7000_1234 },
                Event::Fork { ufd: 42 },
                Event::Remap {
                    from: 0x1000,
                    to: 0x9000,
                    len: 0x2000
                },
                Event::Remove {
                    start: 0x1000,
                    end: 0x3000
                },
                Event::Unmap {
                    start: 0x5000,
                    end: 0x6000
                },
                Event::Other(0x77),
            ]
        );
        // SAFETY: closing our pipe.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}
