//! Restore, early: with `recv --restore` the new process is started as
//! soon as the region table is known, and the migrated pages are copied
//! into it as they arrive, the way QEMU's destination writes incoming pages
//! straight into guest RAM. At the switch-over only the last round's pages
//! are still to be placed, so the source is stopped for the restore's fixed
//! cost, not for a copy of the whole memory.
//!
//! The shell is a [`Child`] stripped of what it inherited (as every restore
//! does), its vDSO moved out of the way, holding a private anonymous
//! mapping for each private anonymous region of the table. It follows the
//! table as the receiver's image does (a region that keeps its start keeps
//! its data), so its memory equals the image's region by region: the
//! restore keeps those mappings instead of copying the image into fresh
//! ones.
//!
//! Everything here is an optimisation. When the shell cannot follow (a
//! region lands on its code page, a write into it fails, the process's
//! final layout needs the code page's address), it is dropped (killed: it
//! never ran) and the restore builds the process from the image as before,
//! saying why in its notes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::build::{free_range_among, kernel_ranges, shift_kernel_mappings, strip};
use super::child::Child;
use super::state::ProcessState;
use crate::protocol::{RegionEntry, PROT_SHARED};

/// Length of the code page and its scratch pages (as [`super::build`]).
pub(super) const CODE_LEN: u64 = 4 * 4096;

/// Whether a region of the table is kept in the shell: private anonymous
/// memory (the heap, malloc arenas, thread stacks). The main stack is
/// mapped with MAP_GROWSDOWN at restore, shared memory and private file
/// mappings from their files, so their pages are not worth copying twice.
pub fn wants(e: &RegionEntry) -> bool {
    e.prot & PROT_SHARED == 0 && !e.name.starts_with('/') && e.name != "[stack]"
}

/// Where the receiver's workers copy pages into the shell. A write that
/// fails marks it broken; the restore then does not use it.
pub struct Mirror {
    pid: i32,
    broken: Mutex<Option<String>>,
    any_broken: AtomicBool,
}

impl Mirror {
    /// Copy `parts` (address in the process, bytes) into the shell.
    pub fn write(&self, parts: &[(u64, &[u8])]) {
        use nix::sys::uio::{process_vm_writev, RemoteIoVec};
        if self.any_broken.load(Ordering::Relaxed) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.pid);
        for chunk in parts.chunks(512) {
            let local: Vec<std::io::IoSlice> = chunk
                .iter()
                .map(|(_, b)| std::io::IoSlice::new(b))
                .collect();
            let remote: Vec<RemoteIoVec> = chunk
                .iter()
                .map(|&(a, b)| RemoteIoVec {
                    base: a as usize,
                    len: b.len(),
                })
                .collect();
            let want: usize = chunk.iter().map(|(_, b)| b.len()).sum();
            match process_vm_writev(pid, &local, &remote) {
                Ok(n) if n == want => {}
                Ok(n) => {
                    return self.fail(format!("a copy into it stopped after {n} of {want} bytes"))
                }
                Err(e) => return self.fail(format!("copying pages into it: {e}")),
            }
        }
    }

    /// Make `ranges` (address, length) zero in the shell, as the image's
    /// pages are. (Written: the kernel takes MADV_DONTNEED only from the
    /// process itself.)
    pub fn zero(&self, ranges: &[(u64, u64)]) {
        static ZEROS: [u8; 256 << 10] = [0; 256 << 10];
        let mut parts = Vec::new();
        for &(a, len) in ranges {
            let mut at = 0;
            while at < len {
                let n = (len - at).min(ZEROS.len() as u64);
                parts.push((a + at, &ZEROS[..n as usize]));
                at += n;
            }
        }
        self.write(&parts);
    }

    fn fail(&self, why: String) {
        self.any_broken.store(true, Ordering::Relaxed);
        let mut b = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        b.get_or_insert(why);
    }

    fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The process under construction during pre-copy.
pub struct Shell {
    /// Taken by the restore ([`Shell::take`]).
    c: Option<Child>,
    code: u64,
    /// The region table it follows (every entry, wanted or not).
    table: Vec<RegionEntry>,
    /// Ranges dropped because post-copy will bring them ([`Shell::drop_pages`]).
    dropped: Vec<(u64, u64)>,
    mirror: Arc<Mirror>,
}

impl Drop for Shell {
    /// A shell dropped without being taken is killed: no copy may go to
    /// its pid any more (it could be another process's by then).
    fn drop(&mut self) {
        self.mirror.fail("the shell was dropped".into());
    }
}

/// What [`super::restore`] takes over from a shell.
pub(super) struct Prebuilt {
    pub c: Child,
    pub code: u64,
    /// Address ranges that hold the image's data (sorted, disjoint).
    pub filled: Vec<(u64, u64)>,
    /// Ranges dropped already (post-copy will bring them).
    pub dropped: Vec<(u64, u64)>,
}

impl Shell {
    /// Start the shell for a process with the region table `table`; with
    /// `pid`, the new process gets that pid (as `--same-pid`).
    pub fn spawn(pid: Option<i32>, table: &[RegionEntry]) -> Result<Shell, String> {
        let mut c = Child::spawn(pid)?;
        let used: Vec<(u64, u64)> = table.iter().map(|e| (e.start, e.end)).collect();
        let code = free_range_among(used.clone(), c.pid, CODE_LEN)?;
        c.map_code(code, CODE_LEN)?;
        strip(&mut c, code)?;
        // No huge pages while it is filled: khugepaged could collapse a
        // range holding absent pages (not yet sent, or dropped for
        // post-copy) into one of zeros. The restore allows them again once
        // a userfaultfd guards the absent pages.
        let pid = c.pid;
        c.call(
            pid,
            libc::SYS_prctl,
            [libc::PR_SET_THP_DISABLE as u64, 1, 0, 0, 0, 0],
        )
        .map_err(|e| format!("prctl(PR_SET_THP_DISABLE): {e}"))?;
        // The vDSO goes just below the code page, out of the regions' way;
        // the restore moves it to the process's old place.
        let kernel = kernel_ranges(c.pid)?;
        if let (Some(&(lo, _)), Some(&(_, hi))) = (kernel.first(), kernel.last()) {
            let mut away = used.clone();
            away.push((code, code + CODE_LEN));
            let to = free_range_among(away.clone(), c.pid, hi - lo)?;
            shift_kernel_mappings(&mut c, away, to.wrapping_sub(lo))?;
        }
        let mirror = Arc::new(Mirror {
            pid: c.pid,
            broken: Mutex::new(None),
            any_broken: AtomicBool::new(false),
        });
        let mut shell = Shell {
            c: Some(c),
            code,
            table: Vec::new(),
            dropped: Vec::new(),
            mirror,
        };
        shell.follow(table)?;
        Ok(shell)
    }

    pub fn mirror(&self) -> Arc<Mirror> {
        self.mirror.clone()
    }

    /// Move to a new region table, as the image does: a wanted region
    /// whose start is unchanged keeps its data (resized); a new one starts
    /// empty; the others go.
    pub fn follow(&mut self, table: &[RegionEntry]) -> Result<(), String> {
        let c = self
            .c
            .as_mut()
            .expect("a shell holds its child until taken");
        let mut kernel = kernel_ranges(c.pid)?;
        kernel.push((self.code, self.code + CODE_LEN));
        for e in table.iter().filter(|e| wants(e)) {
            if kernel.iter().any(|&(a, b)| a < e.end && e.start < b) {
                return Err(format!(
                    "region {:#x}-{:#x} lies where the restorer keeps its code",
                    e.start, e.end
                ));
            }
            if let Some(old) = self.table.iter().find(|o| o.start == e.start) {
                if !wants(old) {
                    // The image keeps that region's data; the shell never had it.
                    return Err(format!(
                        "region {:#x}-{:#x} changed kind between rounds",
                        e.start, e.end
                    ));
                }
            }
        }
        let pid = c.pid;
        let call = |c: &mut Child, nr: i64, args: [u64; 6], what: &str| {
            c.call(pid, nr, args).map_err(|e| format!("{what}: {e}"))
        };
        let same_start =
            |t: &[RegionEntry], s: u64| t.iter().find(|e| e.start == s && wants(e)).cloned();
        // Gone (no wanted successor at the same start): unmapped.
        for o in self.table.iter().filter(|o| wants(o)) {
            if same_start(table, o.start).is_none() {
                call(
                    c,
                    libc::SYS_munmap,
                    [o.start, o.end - o.start, 0, 0, 0, 0],
                    "munmap",
                )?;
            }
        }
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        // NORESERVE: a region may be a large sparse reservation.
        let flags =
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE)
                as u64;
        for e in table.iter().filter(|e| wants(e)) {
            let (from, to) = match same_start(&self.table, e.start) {
                Some(o) if o.end >= e.end => {
                    if o.end > e.end {
                        call(
                            c,
                            libc::SYS_munmap,
                            [e.end, o.end - e.end, 0, 0, 0, 0],
                            "munmap",
                        )?;
                    }
                    continue;
                }
                Some(o) => (o.end, e.end),
                None => (e.start, e.end),
            };
            call(
                c,
                libc::SYS_mmap,
                [from, to - from, rw, flags, u64::MAX, 0],
                &format!("mapping {from:#x}-{to:#x}"),
            )?;
        }
        self.table = table.to_vec();
        Ok(())
    }

    /// Post-copy is coming, and `ranges` (start, end) will come by it:
    /// drop the shell's copies now, while the source still runs the
    /// process, instead of during the downtime. Only while no worker
    /// writes into the shell.
    pub fn drop_pages(&mut self, ranges: &[(u64, u64)]) -> Result<(), String> {
        let held: Vec<(u64, u64)> = self
            .table
            .iter()
            .filter(|e| wants(e))
            .map(|e| (e.start, e.end))
            .collect();
        let held = super::memory::merged(&held);
        use super::memory::{intersect, merged, subtract};
        let ranges = subtract(&intersect(&merged(ranges), &held), &self.dropped);
        if ranges.is_empty() {
            return Ok(());
        }
        let c = self
            .c
            .as_mut()
            .expect("a shell holds its child until taken");
        c.dont_need(self.code + 4096, super::build::SCRATCH_LEN, &ranges)?;
        self.dropped.extend(ranges);
        self.dropped = merged(&self.dropped);
        Ok(())
    }

    /// Hand the shell to the restore of `st`, or say why it cannot serve.
    /// From here on the workers no longer copy into it.
    pub(super) fn take(mut self, st: &ProcessState) -> Result<Prebuilt, String> {
        if let Some(why) = self.mirror.broken() {
            return Err(why);
        }
        let (a, b) = (self.code, self.code + CODE_LEN);
        if let Some(m) = st.mappings.iter().find(|m| m.start < b && a < m.end) {
            return Err(format!(
                "the process maps {:#x}-{:#x}, where the restorer keeps its code",
                m.start, m.end
            ));
        }
        let filled = self
            .table
            .iter()
            .filter(|e| wants(e))
            .map(|e| (e.start, e.end))
            .collect();
        // Out of the shell (which has a Drop): the child and the lists.
        let c = self.c.take().expect("a shell holds its child until taken");
        Ok(Prebuilt {
            c,
            code: self.code,
            filled,
            dropped: std::mem::take(&mut self.dropped),
        })
    }
}
