//! Probing what this kernel offers, for real, on memory of our own.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::Serialize;

use super::soft_dirty::PM_SOFT_DIRTY;
use super::uffd;
use crate::process::{page_size, Pagemap};

/// What the kernel offers; `Err` carries why a feature is unusable.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub soft_dirty: Result<(), String>,
    pub uffd_wp_async: Result<(), String>,
}

/// Anonymous memory of our own, unmapped on drop.
struct Scratch {
    addr: *mut libc::c_void,
    len: usize,
}

impl Scratch {
    fn new(pages: usize) -> Result<Scratch, String> {
        let len = pages * page_size() as usize;
        // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Scratch { addr, len })
    }

    fn page(&self, i: usize) -> u64 {
        self.addr as u64 + i as u64 * page_size()
    }

    fn write(&self, i: usize) {
        // SAFETY: page i lies inside our mapping (callers pass i < pages).
        unsafe { std::ptr::write_volatile(self.page(i) as *mut u8, 0x5a) };
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping we created.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Soft-dirty: after a clear, only the page written must show bit 55.
fn probe_soft_dirty() -> Result<(), String> {
    let me = std::process::id() as i32;
    let s = Scratch::new(2)?;
    s.write(0);
    s.write(1);
    let mut clear = OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .map_err(|e| format!("/proc/self/clear_refs: {e}"))?;
    clear
        .write_all(b"4")
        .map_err(|e| format!("clear_refs: {e}"))?;
    s.write(0);
    let pm = Pagemap::open(me, page_size()).map_err(|e| e.to_string())?;
    let mut e = [0u64; 2];
    pm.read(s.page(0), &mut e).map_err(|e| e.to_string())?;
    match (e[0] & PM_SOFT_DIRTY != 0, e[1] & PM_SOFT_DIRTY != 0) {
        (true, false) => Ok(()),
        (false, _) => Err("a page written after clear_refs does not show soft-dirty (kernel built without CONFIG_MEM_SOFT_DIRTY?)".into()),
        (true, true) => Err("clear_refs did not clear the soft-dirty bit".into()),
    }
}

fn own_uffd() -> Result<OwnedFd, String> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as libc::c_long;
    // SAFETY: userfaultfd(2) takes flags and returns a new descriptor.
    let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        // SAFETY: as above.
        fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                flags | uffd::UFFD_USER_MODE_ONLY as libc::c_long,
            )
        };
    }
    if fd < 0 {
        return Err(format!(
            "userfaultfd(): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// uffd-wp async + PAGEMAP_SCAN: register 4 pages, protect, write one, and
/// the scan must report exactly that page.
fn probe_uffd_wp() -> Result<(), String> {
    let fd = own_uffd()?;
    uffd::enable_wp_async(fd.as_raw_fd(), 0).map_err(|e| format!("UFFDIO_API WP_ASYNC: {e}"))?;
    let s = Scratch::new(4)?;
    let ps = page_size();
    uffd::register_wp(fd.as_raw_fd(), s.page(0), 4 * ps)
        .map_err(|e| format!("UFFDIO_REGISTER: {e}"))?;
    uffd::write_protect(fd.as_raw_fd(), s.page(0), 4 * ps, true)
        .map_err(|e| format!("UFFDIO_WRITEPROTECT: {e}"))?;
    s.write(2);
    let pm = File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    let mut vec = vec![uffd::PageRegion::default(); 8];
    let mut found = Vec::new();
    uffd::scan_written(&pm, s.page(0), s.page(4), &mut vec, |a, b| {
        found.push((a, b))
    })
    .map_err(|e| format!("PAGEMAP_SCAN: {e}"))?;
    if found != [(s.page(2), s.page(3))] {
        return Err(format!(
            "PAGEMAP_SCAN reported {found:x?}, expected only the written page"
        ));
    }
    // A second scan: the page was re-protected in the same walk.
    found.clear();
    uffd::scan_written(&pm, s.page(0), s.page(4), &mut vec, |a, b| {
        found.push((a, b))
    })
    .map_err(|e| format!("PAGEMAP_SCAN: {e}"))?;
    if !found.is_empty() {
        return Err("PAGEMAP_SCAN did not re-protect the written page".into());
    }
    let _ = uffd::unregister(fd.as_raw_fd(), s.page(0), 4 * ps);
    Ok(())
}

pub fn probe() -> Kernel {
    Kernel {
        soft_dirty: probe_soft_dirty(),
        uffd_wp_async: probe_uffd_wp(),
    }
}

/// `procmig info`.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub kernel: String,
    pub arch: String,
    pub page_size: u64,
    pub soft_dirty: String,
    pub uffd_wp_async: String,
    pub auto_choice: String,
    pub ptrace_scope: String,
    pub unprivileged_userfaultfd: String,
    pub syscall_injection: bool,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "absent".into())
}

fn verdict(r: &Result<(), String>) -> String {
    match r {
        Ok(()) => "works".into(),
        Err(e) => format!("unavailable: {e}"),
    }
}

pub fn info() -> Info {
    let k = probe();
    let auto = if k.uffd_wp_async.is_ok() {
        "uffd-wp"
    } else if k.soft_dirty.is_ok() {
        "soft-dirty"
    } else {
        "compare"
    };
    Info {
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        arch: std::env::consts::ARCH.into(),
        page_size: page_size(),
        soft_dirty: verdict(&k.soft_dirty),
        uffd_wp_async: verdict(&k.uffd_wp_async),
        auto_choice: auto.into(),
        ptrace_scope: read_trim("/proc/sys/kernel/yama/ptrace_scope"),
        unprivileged_userfaultfd: read_trim("/proc/sys/vm/unprivileged_userfaultfd"),
        syscall_injection: cfg!(target_arch = "x86_64"),
    }
}

impl std::fmt::Display for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "kernel: {} ({}), page size {}",
            self.kernel, self.arch, self.page_size
        )?;
        writeln!(f, "soft-dirty: {}", self.soft_dirty)?;
        writeln!(f, "uffd-wp (async, PAGEMAP_SCAN): {}", self.uffd_wp_async)?;
        writeln!(f, "compare: works")?;
        writeln!(f, "--dirty-tracking auto picks: {}", self.auto_choice)?;
        writeln!(f, "kernel.yama.ptrace_scope: {}", self.ptrace_scope)?;
        writeln!(
            f,
            "vm.unprivileged_userfaultfd: {}",
            self.unprivileged_userfaultfd
        )?;
        write!(
            f,
            "syscall injection (needed by uffd-wp): {}",
            if self.syscall_injection {
                "supported"
            } else {
                "not on this architecture"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_give_an_answer() {
        // Whatever this kernel has, each probe answers, and auto picks one.
        let i = info();
        assert!(i.soft_dirty == "works" || i.soft_dirty.starts_with("unavailable"));
        assert!(["uffd-wp", "soft-dirty", "compare"].contains(&i.auto_choice.as_str()));
        println!("{i}");
    }
}
