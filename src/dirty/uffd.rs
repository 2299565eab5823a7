//! userfaultfd async write-protect + PAGEMAP_SCAN.
//!
//! The userfaultfd must belong to the target's mm, so it is created inside
//! the target by an injected `userfaultfd(2)`, copied here with
//! pidfd_getfd(2), and closed in the target again. From then on the ioctls
//! act on the target's memory from this process. In WP_ASYNC mode the
//! kernel resolves write faults itself (no handler thread, kernel-mode
//! writes included) and only records that the page was written; one
//! PAGEMAP_SCAN with PM_SCAN_WP_MATCHING returns the written ranges and
//! protects them again in the same walk, so no write falls between report
//! and re-arm. WP_UNPOPULATED makes never-touched pages trackable too.
//!
//! The kernel headers on the build machines are older than the kernels we
//! run on, so the ABI is defined here, with its sizes checked at compile time.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::{CompareTracker, Dirty, DirtyError, DirtyTracker, Tracking};
use crate::process::thp::{self, HugeMapping};
use crate::process::{take_remote_fd, Attachment, Region, RegionKind};
use crate::protocol::Run;

pub const UFFD_API: u64 = 0xAA;
pub const UFFD_USER_MODE_ONLY: u64 = 1;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

#[repr(C)]
#[derive(Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);
const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);

/// `_IOC(dir, type, nr, size)` as the kernel computes it.
const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}
const RW: u64 = 3;
const R: u64 = 2;
pub const UFFDIO_API: u64 = ioc(RW, 0xAA, 0x3F, 24);
pub const UFFDIO_REGISTER: u64 = ioc(RW, 0xAA, 0x00, 32);
pub const UFFDIO_UNREGISTER: u64 = ioc(R, 0xAA, 0x01, 16);
pub const UFFDIO_WRITEPROTECT: u64 = ioc(RW, 0xAA, 0x06, 24);
pub const PAGEMAP_SCAN: u64 = ioc(RW, b'f', 16, 96);

const _: () = assert!(UFFDIO_API == 0xC018AA3F);
const _: () = assert!(UFFDIO_REGISTER == 0xC020AA00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010AA01);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018AA06);
const _: () = assert!(PAGEMAP_SCAN == 0xC0606610);

/// ioctl with a pointer argument; returns the ioctl's non-negative result.
///
/// # Safety
/// `arg` must be the structure `req` expects.
pub unsafe fn ioctl<T>(fd: i32, req: u64, arg: &mut T) -> io::Result<i64> {
    // SAFETY: the caller guarantees `arg` matches `req`; the kernel reads
    // and writes at most size_of::<T>() bytes through it.
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i64)
    }
}

/// UFFDIO_API asking for async write-protect; fails unless every feature
/// asked for is granted.
pub fn enable_wp_async(fd: i32, extra: u64) -> io::Result<()> {
    enable(
        fd,
        UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | extra,
    )
}

/// UFFDIO_API asking for the features `want`; fails unless every one is
/// granted.
pub fn enable(fd: i32, want: u64) -> io::Result<()> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features: want,
        ioctls: 0,
    };
    // SAFETY: UffdioApi is the UFFDIO_API argument.
    unsafe { ioctl(fd, UFFDIO_API, &mut api) }?;
    if api.features & want != want {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("kernel granted features {:#x} of {want:#x}", api.features),
        ));
    }
    Ok(())
}

pub fn register_wp(fd: i32, start: u64, len: u64) -> io::Result<()> {
    register(fd, start, len, UFFDIO_REGISTER_MODE_WP)
}

/// UFFDIO_REGISTER of `[start, start+len)` in `mode`.
pub fn register(fd: i32, start: u64, len: u64, mode: u64) -> io::Result<()> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: UffdioRegister is the UFFDIO_REGISTER argument.
    unsafe { ioctl(fd, UFFDIO_REGISTER, &mut reg) }.map(drop)
}

pub fn unregister(fd: i32, start: u64, len: u64) -> io::Result<()> {
    let mut range = UffdioRange { start, len };
    // SAFETY: UffdioRange is the UFFDIO_UNREGISTER argument.
    unsafe { ioctl(fd, UFFDIO_UNREGISTER, &mut range) }.map(drop)
}

pub fn write_protect(fd: i32, start: u64, len: u64, protect: bool) -> io::Result<()> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    // SAFETY: UffdioWriteprotect is the UFFDIO_WRITEPROTECT argument.
    unsafe { ioctl(fd, UFFDIO_WRITEPROTECT, &mut wp) }.map(drop)
}

/// Written pages in [start, end), re-protected atomically; calls `found`
/// with each written address range. Loops on walk_end.
pub fn scan_written(
    pagemap: &File,
    start: u64,
    end: u64,
    vec: &mut [PageRegion],
    mut found: impl FnMut(u64, u64),
) -> io::Result<()> {
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start: at,
            end,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Default::default()
        };
        // SAFETY: PmScanArg is the PAGEMAP_SCAN argument; `vec` points to
        // vec_len PageRegion entries that live across the call.
        let n = unsafe { ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) }? as usize;
        for r in &vec[..n.min(vec.len())] {
            found(r.start, r.end);
        }
        if arg.walk_end <= at {
            // No progress (e.g. a huge page larger than the buffer allows).
            return Err(io::Error::other(format!(
                "PAGEMAP_SCAN made no progress at {at:#x}"
            )));
        }
        at = arg.walk_end;
    }
    Ok(())
}

/// Regions uffd-wp can track: private anonymous memory (shmem needs
/// WP_HUGETLBFS_SHMEM, which we ask for when available).
fn trackable(r: &Region, shmem: bool) -> bool {
    match r.kind {
        RegionKind::PrivateAnon => true,
        RegionKind::Shared => shmem,
        RegionKind::PrivateFile => false,
    }
}

/// ENOENT from a write-protect: the range was unmapped meanwhile. Other
/// errors stay errors.
fn vanished(r: io::Result<()>) -> io::Result<bool> {
    match r {
        Ok(()) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(true),
        Err(e) => Err(e),
    }
}

pub struct UffdTracker {
    pid: i32,
    page_size: u64,
    uffd: Option<OwnedFd>,
    pagemap: File,
    shmem: bool,
    /// Ranges registered, by (start, end).
    registered: HashSet<(u64, u64)>,
    fallback: CompareTracker,
    vec: Vec<PageRegion>,
    /// Mappings that held huge pages when tracking began: collapsed again
    /// when it ends (see process::thp).
    huge: Vec<HugeMapping>,
}

impl UffdTracker {
    pub fn new(pid: i32, page_size: u64) -> Result<UffdTracker, DirtyError> {
        let pagemap =
            File::open(format!("/proc/{pid}/pagemap")).map_err(|source| DirtyError::Op {
                method: Tracking::UffdWp,
                pid,
                what: "open pagemap".into(),
                source,
            })?;
        Ok(UffdTracker {
            pid,
            page_size,
            uffd: None,
            pagemap,
            shmem: false,
            registered: HashSet::new(),
            fallback: CompareTracker::new(pid, page_size)?,
            vec: vec![PageRegion::default(); 4096],
            huge: Vec::new(),
        })
    }

    fn op(&self, what: String) -> impl FnOnce(io::Error) -> DirtyError {
        let pid = self.pid;
        move |source| DirtyError::Op {
            method: Tracking::UffdWp,
            pid,
            what,
            source,
        }
    }

    /// Create a userfaultfd inside the target, take it over, and close the
    /// target's copy (its fd table ends up exactly as it was).
    fn inject_uffd(&self, att: &mut Attachment) -> Result<OwnedFd, DirtyError> {
        let tid = att.tids()[0];
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let mut remote = att.inject_syscall(tid, libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])?;
        if remote == -(libc::EPERM as i64) {
            // Unprivileged: user-mode-only is enough in async mode, where
            // the kernel resolves every write fault itself.
            remote = att.inject_syscall(
                tid,
                libc::SYS_userfaultfd,
                [flags | UFFD_USER_MODE_ONLY, 0, 0, 0, 0, 0],
            )?;
        }
        if remote < 0 {
            return Err(DirtyError::Unavailable {
                method: Tracking::UffdWp,
                reason: format!(
                    "userfaultfd() inside process {} failed: {}",
                    self.pid,
                    io::Error::from_raw_os_error(-remote as i32)
                ),
            });
        }
        let taken = take_remote_fd(self.pid, remote as i32);
        att.close_remote_fd(tid, remote as i32)?;
        Ok(taken?)
    }

    fn create_fd(&mut self, att: &mut Attachment) -> Result<(), DirtyError> {
        // UFFDIO_API may be issued once per fd: try with shmem support, and
        // on refusal with a second fd without it.
        let fd = self.inject_uffd(att)?;
        if enable_wp_async(fd.as_raw_fd(), UFFD_FEATURE_WP_HUGETLBFS_SHMEM).is_ok() {
            self.shmem = true;
            self.uffd = Some(fd);
            return Ok(());
        }
        drop(fd);
        let fd = self.inject_uffd(att)?;
        enable_wp_async(fd.as_raw_fd(), 0).map_err(|e| DirtyError::Unavailable {
            method: Tracking::UffdWp,
            reason: format!("UFFDIO_API with WP_ASYNC | WP_UNPOPULATED: {e}"),
        })?;
        self.shmem = false;
        self.uffd = Some(fd);
        Ok(())
    }

    /// Register and write-protect [start, end) of a region.
    fn arm_range(&mut self, start: u64, end: u64) -> io::Result<()> {
        let fd = self.uffd.as_ref().expect("armed").as_raw_fd();
        register_wp(fd, start, end - start)?;
        write_protect(fd, start, end - start, true)
    }

    fn arm_region(&mut self, r: &Region) -> bool {
        if !trackable(r, self.shmem) {
            return false;
        }
        match self.arm_range(r.start, r.end) {
            Ok(()) => {
                self.registered.insert((r.start, r.end));
                true
            }
            Err(_) => false,
        }
    }
}

impl DirtyTracker for UffdTracker {
    fn method(&self) -> Tracking {
        Tracking::UffdWp
    }

    fn arm(&mut self, att: &mut Attachment, regions: &[Region]) -> Result<(), DirtyError> {
        self.huge = thp::huge_mappings(self.pid);
        self.create_fd(att)?;
        let mut rest = Vec::new();
        for r in regions {
            if !self.arm_region(r) {
                rest.push(r.clone());
            }
        }
        self.fallback.arm(att, &rest)
    }

    fn collect(
        &mut self,
        att: Option<&mut Attachment>,
        regions: &[Region],
        fresh: &[(usize, Run)],
    ) -> Result<Dirty, DirtyError> {
        let ps = self.page_size;
        let fd = self.uffd.as_ref().expect("armed").as_raw_fd();
        let mut dirty = Dirty {
            runs: vec![Vec::new(); regions.len()],
            refresh: Vec::new(),
        };
        let mut fb_index = Vec::new();
        for (i, r) in regions.iter().enumerate() {
            if !trackable(r, self.shmem) {
                fb_index.push(i);
                continue;
            }
            if !self.registered.contains(&(r.start, r.end)) {
                // New or resized: register the whole range (re-registering
                // our own part is allowed) and arm only the fresh parts the
                // caller will send whole, keeping the rest's state.
                self.registered
                    .retain(|&(s, e)| !(s < r.end && r.start < e));
                if register_wp(fd, r.start, r.len()).is_err() {
                    fb_index.push(i);
                    continue;
                }
                self.registered.insert((r.start, r.end));
                let mut any = false;
                let mut gone = false;
                for (_, run) in fresh.iter().filter(|(fi, _)| *fi == i) {
                    any = true;
                    let s = r.start + run.first * ps;
                    gone |= vanished(write_protect(fd, s, run.count as u64 * ps, true))
                        .map_err(self.op(format!("write-protect {s:#x}")))?;
                }
                if !any {
                    gone |= vanished(write_protect(fd, r.start, r.len(), true))
                        .map_err(self.op(format!("write-protect {:#x}", r.start)))?;
                }
                if gone {
                    // Unmapped since the maps were read (the process runs):
                    // send what is there again; the next sync sees the
                    // maps as they are now.
                    self.registered.remove(&(r.start, r.end));
                    dirty.refresh.push(i);
                    continue;
                }
                if !any {
                    dirty.refresh.push(i);
                    continue;
                }
            }
            let mut found = Vec::new();
            let mut vec = std::mem::take(&mut self.vec);
            let scanned = scan_written(&self.pagemap, r.start, r.end, &mut vec, |s, e| {
                found.push((s, e))
            });
            self.vec = vec;
            match scanned {
                Ok(()) => {
                    for (s, e) in found {
                        crate::pages::push_run(
                            &mut dirty.runs[i],
                            (s - r.start) / ps,
                            (e - s) / ps,
                        );
                    }
                }
                // EPERM: part of the range is not our registered VMA any
                // more (unmapped and mapped again in place): start over.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    self.registered.remove(&(r.start, r.end));
                    if self.arm_region(r) {
                        dirty.refresh.push(i);
                    } else {
                        fb_index.push(i);
                    }
                }
                Err(e) => {
                    return Err(self.op(format!("PAGEMAP_SCAN {:#x}-{:#x}", r.start, r.end))(e))
                }
            }
        }
        // Forget registrations of regions that are gone.
        self.registered
            .retain(|&(s, e)| regions.iter().any(|r| r.start == s && r.end == e));
        if !fb_index.is_empty() {
            let fb_regions: Vec<Region> = fb_index.iter().map(|&i| regions[i].clone()).collect();
            let fb_fresh: Vec<(usize, Run)> = fresh
                .iter()
                .filter_map(|(fi, run)| fb_index.iter().position(|x| x == fi).map(|j| (j, *run)))
                .collect();
            let d = self.fallback.collect(att, &fb_regions, &fb_fresh)?;
            for (j, runs) in d.runs.into_iter().enumerate() {
                dirty.runs[fb_index[j]] = runs;
            }
            dirty
                .refresh
                .extend(d.refresh.into_iter().map(|j| fb_index[j]));
        }
        Ok(dirty)
    }

    fn sent(&mut self, region: &Region, runs: &[Run], data: &[u8], page_size: u64) {
        if !self.registered.contains(&(region.start, region.end)) {
            self.fallback.sent(region, runs, data, page_size);
        }
    }

    fn finish(&mut self, att: Option<&mut Attachment>) {
        if let Some(fd) = self.uffd.take() {
            for &(s, e) in &self.registered {
                let _ = write_protect(fd.as_raw_fd(), s, e - s, false);
                let _ = unregister(fd.as_raw_fd(), s, e - s);
            }
            // Closing the last reference releases the context in the kernel.
            drop(fd);
        }
        self.registered.clear();
        // Best effort: a range that cannot be collapsed (memory pressure,
        // a kernel before 6.1) stays as the kernel left it.
        let _ = thp::collapse(self.pid, &std::mem::take(&mut self.huge));
        self.fallback.finish(att);
    }

    fn fallback_regions(&self) -> usize {
        self.fallback.tracked()
    }
}

impl Drop for UffdTracker {
    fn drop(&mut self) {
        self.finish(None);
    }
}
