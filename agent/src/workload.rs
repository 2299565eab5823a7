//! The live workload: map the region, format and fill it, and run the
//! threads that keep changing its pages: writers rewrite pages, the discard
//! thread drops pages with `MADV_DONTNEED`, the kernel-write thread has the
//! kernel rewrite pages with read(2) from a pipe. All of them follow the
//! protocol in [`crate::layout`].
//!
//! Everything here works on a plain `&mut [u8]` region buffer, so tests can
//! build a region in memory; [`map_region`] provides the real one at
//! [`crate::layout::BASE`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::slice;
use std::sync::atomic::{fence, AtomicU32, Ordering::*};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::content::{fill_page, mix64, Profile, SplitMix};
use crate::layout::{
    next_gen, Header, Layout, DISCARDED, LAYOUT_VERSION, LEDGER_ENTRY, MAGIC, MAX_THREADS,
};

/// What the workload does, as given on the command line.
#[derive(Debug, Clone)]
pub struct Params {
    pub profile: Profile,
    pub seed: u64,
    /// Page rewrites per second, all writers together (0: none).
    pub dirty_rate: u64,
    /// Writers pick pages among the first this many data pages
    /// (`None`: all of them). Clamped to `1..=data_pages`.
    pub working_set_pages: Option<u64>,
    /// If non-zero, writers cycle over the first this many data pages
    /// instead (clamped to `data_pages`).
    pub hot_pages: u64,
    /// Writer threads, `1..=MAX_THREADS`.
    pub threads: usize,
    /// Threads for the initial fill (at least 1).
    pub fill_threads: usize,
    /// Pages discarded per second (0: none). Recorded in the header.
    pub dontneed_rate: u64,
    /// Pages rewritten per second by read(2) from a pipe (0: none).
    /// Recorded in the header.
    pub kernel_write_rate: u64,
    /// Churn events per second (0: none). Recorded in the header.
    pub churn_rate: u64,
}

/// [`Params`] checked against a layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub working_set_pages: u64,
    pub hot_pages: u64,
    /// Writers actually used: never more than the pages they share.
    pub writers: usize,
}

impl Params {
    pub fn plan(&self, layout: &Layout) -> Plan {
        let ws = self
            .working_set_pages
            .unwrap_or(layout.data_pages)
            .clamp(1, layout.data_pages);
        let hot = self.hot_pages.min(layout.data_pages);
        let set = if hot > 0 { hot } else { ws };
        let writers = self.threads.clamp(1, MAX_THREADS).min(set as usize);
        Plan {
            working_set_pages: ws,
            hot_pages: hot,
            writers,
        }
    }
}

/// A formatted region: header, ledger and data pages.
pub struct Ram<'a> {
    layout: Layout,
    params: Params,
    plan: Plan,
    header: &'a Header,
    ledger: &'a [AtomicU32],
    data: &'a mut [u8],
}

impl<'a> Ram<'a> {
    /// Format `buf` (the region at its base: 8-byte aligned, at least
    /// `layout.total_size` bytes) as a region: write the header, zero the
    /// ledger and fill every data page with generation 0, using
    /// `params.fill_threads` threads.
    pub fn create(buf: &'a mut [u8], layout: Layout, params: &Params) -> Result<Ram<'a>, String> {
        let ps = layout.page_size as usize;
        if (buf.len() as u64) < layout.total_size {
            return Err(format!(
                "region buffer is {} bytes, layout needs {}",
                buf.len(),
                layout.total_size
            ));
        }
        if buf.as_ptr() as usize % 8 != 0 {
            return Err("region buffer is not 8-byte aligned".into());
        }
        if ps < std::mem::size_of::<Header>() {
            return Err(format!("page size {ps} cannot hold the header"));
        }
        let plan = params.plan(&layout);
        let (head, rest) = buf.split_at_mut(ps);
        let (ledger_bytes, rest) = rest.split_at_mut(layout.ledger_pages as usize * ps);
        let data = &mut rest[..layout.data_pages as usize * ps];

        // SAFETY: `head` is one page long, which holds a Header (checked
        // above), and starts at the 8-byte aligned start of `buf`. Every
        // field of Header is a u64 or an atomic u64, for which any bit
        // pattern is valid. `head` is borrowed exclusively for 'a, so no
        // other reference to these bytes exists.
        let header: &'a mut Header = unsafe { &mut *head.as_mut_ptr().cast::<Header>() };
        header.magic = MAGIC;
        header.version = LAYOUT_VERSION;
        header.total_size = layout.total_size;
        header.page_size = layout.page_size;
        header.data_pages = layout.data_pages;
        header.ledger_pages = layout.ledger_pages;
        header.profile = params.profile.code();
        header.seed = params.seed;
        header.working_set_pages = plan.working_set_pages;
        header.hot_pages = plan.hot_pages;
        header.threads = plan.writers as u64;
        header.dirty_rate = params.dirty_rate;
        header.writes.store(0, SeqCst);
        header.churn_events.store(0, SeqCst);
        header.discards.store(0, SeqCst);
        header.kernel_writes.store(0, SeqCst);
        header.dontneed_rate = params.dontneed_rate;
        header.kernel_write_rate = params.kernel_write_rate;
        header.churn_rate = params.churn_rate;
        for (t, (rng, inflight)) in header.rng.iter().zip(&header.inflight).enumerate() {
            rng.store(mix64(params.seed ^ mix64(t as u64 + 1)), SeqCst);
            inflight.store(0, SeqCst);
        }
        let header: &'a Header = header;

        assert!(ledger_bytes.len() as u64 >= layout.data_pages * LEDGER_ENTRY);
        // SAFETY: `ledger_bytes` holds at least data_pages u32s (asserted
        // above), starts one page after an 8-byte aligned address, so it is
        // 4-byte aligned, and any bit pattern is a valid AtomicU32. It is
        // borrowed exclusively for 'a; the pointer comes from a mutable
        // borrow, so the atomics may write through it.
        let ledger: &'a [AtomicU32] = unsafe {
            slice::from_raw_parts(
                ledger_bytes.as_mut_ptr().cast::<AtomicU32>(),
                layout.data_pages as usize,
            )
        };
        for g in ledger {
            g.store(0, Relaxed);
        }
        fence(SeqCst);

        fill(data, ps, params.profile, params.seed, params.fill_threads);
        fence(SeqCst);
        Ok(Ram {
            layout,
            params: params.clone(),
            plan,
            header,
            ledger,
            data,
        })
    }

    #[cfg(test)]
    pub fn header(&self) -> &'a Header {
        self.header
    }

    /// [`Ram::into_writers`], shared: see [`Pool`].
    pub fn into_pool(self) -> Pool<'a> {
        let header = self.header;
        let set = if self.plan.hot_pages > 0 {
            self.plan.hot_pages
        } else {
            self.plan.working_set_pages
        };
        let writers = self.into_writers();
        Pool {
            firsts: writers.iter().map(|w| w.first).collect(),
            writers: writers.into_iter().map(Mutex::new).collect(),
            set,
            header,
        }
    }

    /// Hand the pages writers rewrite to [`Plan::writers`] writers: writer
    /// `t` owns a contiguous share of the set (hot pages, or else the
    /// working set), so no two writers ever rewrite the same page.
    pub fn into_writers(self) -> Vec<Writer<'a>> {
        let ps = self.layout.page_size as usize;
        let (set, cyclic) = if self.plan.hot_pages > 0 {
            (self.plan.hot_pages, true)
        } else {
            (self.plan.working_set_pages, false)
        };
        let n = self.plan.writers as u64;
        let mut rest = &mut self.data[..set as usize * ps];
        let mut writers = Vec::with_capacity(n as usize);
        for t in 0..n {
            let first = set * t / n;
            let end = set * (t + 1) / n;
            let (mine, tail) = rest.split_at_mut((end - first) as usize * ps);
            rest = tail;
            writers.push(Writer {
                slot: t as usize,
                first,
                count: end - first,
                pages: mine,
                page_size: ps,
                header: self.header,
                ledger: self.ledger,
                profile: self.params.profile,
                seed: self.params.seed,
                cyclic,
                cursor: 0,
            });
        }
        writers
    }
}

/// Fill every page of `data` with generation 0, on `threads` threads.
pub fn fill(data: &mut [u8], page_size: usize, profile: Profile, seed: u64, threads: usize) {
    let pages = data.len() / page_size;
    if pages == 0 {
        return;
    }
    let per_thread = pages.div_ceil(threads.max(1));
    thread::scope(|s| {
        for (c, chunk) in data.chunks_mut(per_thread * page_size).enumerate() {
            let first = (c * per_thread) as u64;
            s.spawn(move || {
                for (k, page) in chunk.chunks_exact_mut(page_size).enumerate() {
                    fill_page(profile, seed, first + k as u64, 0, page);
                }
            });
        }
    });
}

/// One writer thread's share of the pages and its slot in the header.
pub struct Writer<'a> {
    slot: usize,
    /// Index of the first data page this writer owns.
    first: u64,
    count: u64,
    pages: &'a mut [u8],
    page_size: usize,
    header: &'a Header,
    ledger: &'a [AtomicU32],
    profile: Profile,
    seed: u64,
    /// Cycle over the pages in order (hot pages) instead of picking at random.
    cyclic: bool,
    cursor: u64,
}

impl Writer<'_> {
    /// Data pages `first..first + count` are this writer's.
    #[cfg(test)]
    pub fn pages(&self) -> (u64, u64) {
        (self.first, self.count)
    }

    /// Pick the next page (at random, or the next hot page) and rewrite it.
    /// Returns its data page index.
    pub fn rewrite_next(&mut self) -> u64 {
        let local = if self.cyclic {
            let c = self.cursor;
            self.cursor = (c + 1) % self.count;
            c
        } else {
            // The PRNG state lives in the header, like everything else the
            // workload knows.
            let slot = &self.header.rng[self.slot];
            let mut rng = SplitMix(slot.load(Relaxed));
            let local = rng.below(self.count);
            slot.store(rng.0, Relaxed);
            local
        };
        self.rewrite(local);
        self.first + local
    }

    /// Rewrite this writer's page `local` (data page `first + local`) with
    /// its next generation, following the protocol in [`crate::layout`].
    pub fn rewrite(&mut self, local: u64) {
        let (index, gen) = self.begin(local);
        let ps = self.page_size;
        let page = &mut self.pages[local as usize * ps..(local as usize + 1) * ps];
        fill_page(self.profile, self.seed, index, gen, page);
        self.finish();
    }

    /// Steps 1 and 2 of a rewrite: mark the page in flight and bump its
    /// generation. Returns `(index, new generation)`.
    pub(crate) fn begin(&mut self, local: u64) -> (u64, u32) {
        assert!(local < self.count, "page {local} is not this writer's");
        let index = self.first + local;
        self.header.inflight[self.slot].store(index + 1, SeqCst);
        let entry = &self.ledger[index as usize];
        // Continues the generation of a discarded page and clears the
        // flag. Wrapping would take 2^31 rewrites of one page; it skips 0,
        // which means "initial fill".
        let gen = next_gen(entry.load(SeqCst));
        entry.store(gen, SeqCst);
        // Keep the page writes after the ledger bump, even for the compiler.
        fence(SeqCst);
        (index, gen)
    }

    /// Steps 4 and 5 of a rewrite: count it and clear the in-flight slot.
    pub(crate) fn finish(&mut self) {
        fence(SeqCst);
        self.header.writes.fetch_add(1, SeqCst);
        self.header.inflight[self.slot].store(0, SeqCst);
    }

    /// Rewrite this writer's page `local` the way [`Writer::rewrite`]
    /// does, except that the new content goes into `pipe` and is read(2)
    /// from it straight into the page: the kernel writes the page
    /// (copy_to_user), not this process. If the pipe fails, the content is
    /// copied in directly so that the page still follows the protocol, and
    /// the error is returned.
    pub fn kernel_rewrite(&mut self, local: u64, pipe: &mut KernelPipe) -> io::Result<()> {
        let (index, gen) = self.begin(local);
        let ps = self.page_size;
        fill_page(self.profile, self.seed, index, gen, &mut pipe.scratch);
        let page = &mut self.pages[local as usize * ps..(local as usize + 1) * ps];
        let moved = pipe
            .tx
            .write_all(&pipe.scratch)
            .and_then(|()| pipe.rx.read_exact(page));
        if moved.is_err() {
            page.copy_from_slice(&pipe.scratch);
        }
        fence(SeqCst);
        self.header.writes.fetch_add(1, SeqCst);
        if moved.is_ok() {
            self.header.kernel_writes.fetch_add(1, SeqCst);
        }
        self.header.inflight[self.slot].store(0, SeqCst);
        moved
    }

    /// Discard this writer's page `local` (see [`crate::layout`]): flag
    /// its ledger entry, then `MADV_DONTNEED` it so that it reads as zero.
    /// Returns false (and does nothing) if it is already discarded.
    pub fn discard(&mut self, local: u64) -> bool {
        assert!(local < self.count, "page {local} is not this writer's");
        let index = self.first + local;
        let entry = &self.ledger[index as usize];
        let before = entry.load(SeqCst);
        if before & DISCARDED != 0 {
            return false;
        }
        self.header.inflight[self.slot].store(index + 1, SeqCst);
        entry.store(before | DISCARDED, SeqCst);
        fence(SeqCst);
        let ps = self.page_size;
        drop_page(&mut self.pages[local as usize * ps..(local as usize + 1) * ps]);
        fence(SeqCst);
        self.header.discards.fetch_add(1, SeqCst);
        self.header.inflight[self.slot].store(0, SeqCst);
        true
    }
}

/// Give a page back to the kernel so that it reads as zero; zero it by hand
/// if madvise refuses (say `page` is not page-aligned heap memory).
fn drop_page(page: &mut [u8]) {
    // SAFETY: `page` is memory this process owns and that nothing else
    // refers to (it is borrowed mutably); MADV_DONTNEED on private
    // anonymous memory only replaces its bytes with zeros, which are a
    // valid [u8]. The pointer comes from the mutable borrow, so the
    // compiler treats the call as a write to it.
    let rc = unsafe {
        libc::madvise(
            page.as_mut_ptr().cast::<libc::c_void>(),
            page.len(),
            libc::MADV_DONTNEED,
        )
    };
    if rc != 0 {
        page.fill(0);
    }
}

/// The pipe of the kernel-write thread, and a page to build content in.
pub struct KernelPipe {
    rx: File,
    tx: File,
    scratch: Vec<u8>,
}

impl KernelPipe {
    pub fn new(page_size: usize) -> io::Result<KernelPipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given,
        // which has room for them.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors that
        // nothing else owns.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(KernelPipe {
            rx: File::from(rx),
            tx: File::from(tx),
            scratch: vec![0; page_size],
        })
    }
}

/// The writers, each behind a mutex, so that the discard and kernel-write
/// threads can act on any page of the set on behalf of the slot that owns
/// it, never at the same time as that slot's writer.
pub struct Pool<'a> {
    writers: Vec<Mutex<Writer<'a>>>,
    /// First data page of each writer's share, ascending.
    firsts: Vec<u64>,
    /// The shares cover data pages `0..set`.
    set: u64,
    header: &'a Header,
}

impl<'a> Pool<'a> {
    /// Number of writer slots.
    pub fn writers(&self) -> usize {
        self.writers.len()
    }

    pub fn header(&self) -> &'a Header {
        self.header
    }

    fn lock(&self, t: usize) -> MutexGuard<'_, Writer<'a>> {
        // A panicking thread leaves the page protocol mid-way at worst,
        // which verify tolerates; keep going.
        self.writers[t]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer owning data page `index` (`< set`) and the page's place
    /// in its share.
    fn owner(&self, index: u64) -> (usize, u64) {
        let t = self.firsts.partition_point(|&f| f <= index) - 1;
        (t, index - self.firsts[t])
    }

    /// Discard data page `index` of the set; false if already discarded.
    pub fn discard(&self, index: u64) -> bool {
        let (t, local) = self.owner(index);
        self.lock(t).discard(local)
    }

    /// Rewrite data page `index` of the set through `pipe`.
    pub fn kernel_rewrite(&self, index: u64, pipe: &mut KernelPipe) -> io::Result<()> {
        let (t, local) = self.owner(index);
        self.lock(t).kernel_rewrite(local, pipe)
    }

    /// Writer `t`'s loop: rewrite its pages at `rate` pages per second.
    pub fn run_writer(&self, t: usize, rate: f64) -> ! {
        pace(rate, || {
            self.lock(t).rewrite_next();
        })
    }

    /// The discard thread's loop: discard a random page of the set
    /// `rate` times per second.
    pub fn run_discards(&self, rate: f64, seed: u64) -> ! {
        let mut rng = SplitMix(mix64(seed ^ 0x6469_7363_6172_6400));
        pace(rate, || {
            self.discard(rng.below(self.set));
        })
    }

    /// The kernel-write thread's loop: rewrite a random page of the set
    /// through `pipe` `rate` times per second. After a pipe error it
    /// reports it on stderr and goes on with plain rewrites.
    pub fn run_kernel_writes(&self, rate: f64, seed: u64, mut pipe: KernelPipe) -> ! {
        let mut rng = SplitMix(mix64(seed ^ 0x6b65_726e_656c_0000));
        let mut broken = false;
        pace(rate, || {
            let index = rng.below(self.set);
            if broken {
                let (t, local) = self.owner(index);
                self.lock(t).rewrite(local);
            } else if let Err(e) = self.kernel_rewrite(index, &mut pipe) {
                eprintln!(
                    "procmig-agent: kernel writes: pipe failed ({e}); rewriting pages directly"
                );
                broken = true;
            }
        })
    }
}

/// Call `step` `rate` times per second forever, in small batches every
/// millisecond. If the rate cannot be met, run flat out; after a stall (say
/// the process was stopped), do not try to catch up on more than 10 ms of
/// backlog.
pub fn pace(rate: f64, mut step: impl FnMut()) -> ! {
    const TICK: Duration = Duration::from_millis(1);
    let start = Instant::now();
    let max_backlog = ((rate / 100.0) as u64).clamp(8, 1 << 20);
    let batch = max_backlog.clamp(64, 4096);
    let mut done = 0u64;
    loop {
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        if due > done.saturating_add(max_backlog) {
            done = due - max_backlog;
        }
        if done < due {
            let n = (due - done).min(batch);
            for _ in 0..n {
                step();
            }
            done += n;
        } else {
            thread::sleep(TICK);
        }
    }
}

/// Map `len` bytes of anonymous private memory at exactly `base`, refusing
/// to replace an existing mapping. Transparent huge pages are disabled on
/// it so that dirty tracking stays per 4 KiB page. The mapping is never
/// unmapped: it lives until the process dies.
pub fn map_region(base: u64, len: u64) -> Result<&'static mut [u8], String> {
    let end = base + len;
    // SAFETY: a fixed mapping that may not replace anything
    // (MAP_FIXED_NOREPLACE) cannot invalidate memory the program uses; the
    // result is checked below.
    let p = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let err = io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EEXIST) {
            format!("cannot map the RAM region at {base:#x}-{end:#x}: the address range is already in use")
        } else {
            format!("cannot map {len} bytes at {base:#x}: {err}")
        });
    }
    if p as u64 != base {
        // A kernel older than 4.17 treats the address as a hint only.
        // SAFETY: `p` is the mapping of `len` bytes just created, and
        // nothing refers to it.
        unsafe { libc::munmap(p, len as usize) };
        return Err(format!(
            "cannot map the RAM region at {base:#x}: the kernel placed it at {:#x} (kernel too old for MAP_FIXED_NOREPLACE?)",
            p as u64
        ));
    }
    // SAFETY: madvise on a mapping we own; a failure is harmless.
    unsafe { libc::madvise(p, len as usize, libc::MADV_NOHUGEPAGE) };
    // SAFETY: the mapping is `len` readable and writable bytes, zero
    // filled, and is never unmapped; this is the only reference to it.
    Ok(unsafe { slice::from_raw_parts_mut(p.cast::<u8>(), len as usize) })
}

/// A zeroed, page-aligned heap buffer standing in for the mapping in tests.
#[cfg(test)]
pub mod testbuf {
    use std::alloc::{alloc_zeroed, dealloc, Layout};

    pub struct PageBuf {
        ptr: *mut u8,
        layout: Layout,
    }

    impl PageBuf {
        pub fn new(len: usize) -> PageBuf {
            let layout = Layout::from_size_align(len, 4096).unwrap();
            assert!(len > 0);
            // SAFETY: the layout has a non-zero size.
            let ptr = unsafe { alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            PageBuf { ptr, layout }
        }

        pub fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: `ptr` is a live allocation of `layout.size()` bytes,
            // initialized (zeroed), borrowed through `&mut self`.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
        }
    }

    impl Drop for PageBuf {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this very layout.
            unsafe { dealloc(self.ptr, self.layout) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testbuf::PageBuf;
    use super::*;
    use crate::content::{page_matches, read_stamp};

    fn params(profile: Profile, threads: usize) -> Params {
        Params {
            profile,
            seed: 7,
            dirty_rate: 0,
            working_set_pages: None,
            hot_pages: 0,
            threads,
            fill_threads: 3,
            dontneed_rate: 0,
            kernel_write_rate: 0,
            churn_rate: 0,
        }
    }

    #[test]
    fn plan_clamps() {
        let layout = Layout::compute(1 << 20, 4096).unwrap();
        let mut p = params(Profile::Text, 4);
        assert_eq!(
            p.plan(&layout),
            Plan {
                working_set_pages: layout.data_pages,
                hot_pages: 0,
                writers: 4
            }
        );
        p.working_set_pages = Some(1 << 40);
        p.hot_pages = 3;
        p.threads = 64;
        assert_eq!(
            p.plan(&layout),
            Plan {
                working_set_pages: layout.data_pages,
                hot_pages: 3,
                writers: 3
            }
        );
        p.working_set_pages = Some(0);
        p.hot_pages = 0;
        assert_eq!(p.plan(&layout).working_set_pages, 1);
        assert_eq!(p.plan(&layout).writers, 1);
    }

    #[test]
    fn fill_and_rewrite() {
        let layout = Layout::compute(64 * 4096, 4096).unwrap();
        let mut buf = PageBuf::new(layout.total_size as usize);
        let mut p = params(Profile::Mixed, 3);
        p.working_set_pages = Some(20);
        let ram = Ram::create(buf.bytes(), layout, &p).unwrap();
        let header = ram.header();
        let mut writers = ram.into_writers();
        assert_eq!(writers.len(), 3);
        assert_eq!(
            writers.iter().map(Writer::pages).collect::<Vec<_>>(),
            [(0, 6), (6, 7), (13, 7)]
        );
        let mut touched = std::collections::HashMap::new();
        for k in 0..200 {
            let w = &mut writers[k % 3];
            let i = w.rewrite_next();
            assert!(i < 20);
            *touched.entry(i).or_insert(0u32) += 1;
        }
        assert_eq!(header.writes.load(SeqCst), 200);
        drop(writers);

        let bytes = buf.bytes();
        let ps = 4096;
        let mut scratch = vec![0; ps];
        for i in 0..layout.data_pages {
            let gen = u32::from_ne_bytes(
                bytes[ps + 4 * i as usize..ps + 4 * i as usize + 4]
                    .try_into()
                    .unwrap(),
            );
            assert_eq!(gen, touched.get(&i).copied().unwrap_or(0), "page {i}");
            let off = layout.page_offset(i) as usize;
            let page = &bytes[off..off + ps];
            assert!(page_matches(Profile::Mixed, 7, i, gen, page, &mut scratch));
            if gen > 0 {
                assert_eq!(read_stamp(page), Some((i, gen)));
            }
        }
    }

    fn entry(bytes: &[u8], i: u64) -> u32 {
        let at = 4096 + 4 * i as usize;
        u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn pool_finds_owners() {
        let layout = Layout::compute(64 * 4096, 4096).unwrap();
        let mut buf = PageBuf::new(layout.total_size as usize);
        let mut p = params(Profile::Text, 3);
        p.working_set_pages = Some(20);
        let pool = Ram::create(buf.bytes(), layout, &p).unwrap().into_pool();
        assert_eq!(pool.writers(), 3);
        assert_eq!(pool.set, 20);
        let owners: Vec<_> = [0, 5, 6, 12, 13, 19].map(|i| pool.owner(i)).into();
        assert_eq!(owners, [(0, 0), (0, 5), (1, 0), (1, 6), (2, 0), (2, 6)]);
    }

    #[test]
    fn discard_then_rewrite_continues_the_generation() {
        let layout = Layout::compute(64 * 4096, 4096).unwrap();
        let mut buf = PageBuf::new(layout.total_size as usize);
        let mut p = params(Profile::Mixed, 2);
        p.working_set_pages = Some(20);
        let ram = Ram::create(buf.bytes(), layout, &p).unwrap();
        let header = ram.header();
        let pool = ram.into_pool();
        let mut pipe = KernelPipe::new(4096).unwrap();
        // Page 3 (writer 0): two rewrites, a discard, a kernel rewrite.
        pool.lock(0).rewrite(3);
        pool.lock(0).rewrite(3);
        assert!(pool.discard(3));
        assert!(!pool.discard(3), "already discarded");
        // Page 15 (writer 1): discarded at generation 0 and left so.
        assert!(pool.discard(15));
        // Page 12 (writer 1): kernel rewrites only.
        pool.kernel_rewrite(12, &mut pipe).unwrap();
        pool.kernel_rewrite(12, &mut pipe).unwrap();
        let ledger = pool.lock(0).ledger;
        assert_eq!(ledger[3].load(SeqCst), DISCARDED | 2);
        assert_eq!(ledger[15].load(SeqCst), DISCARDED);
        assert_eq!(ledger[12].load(SeqCst), 2);
        pool.kernel_rewrite(3, &mut pipe).unwrap();
        assert_eq!(header.writes.load(SeqCst), 5);
        assert_eq!(header.kernel_writes.load(SeqCst), 3);
        assert_eq!(header.discards.load(SeqCst), 2);
        assert!(header.inflight.iter().all(|s| s.load(SeqCst) == 0));
        drop(pool);

        let bytes = buf.bytes();
        let mut scratch = vec![0; 4096];
        assert_eq!(entry(bytes, 3), 3, "generation continues after the discard");
        assert_eq!(entry(bytes, 12), 2);
        assert_eq!(entry(bytes, 15), DISCARDED);
        let page = |i: u64| {
            let at = layout.page_offset(i) as usize;
            &bytes[at..at + 4096]
        };
        assert!(page_matches(Profile::Mixed, 7, 3, 3, page(3), &mut scratch));
        assert!(page_matches(
            Profile::Mixed,
            7,
            12,
            2,
            page(12),
            &mut scratch
        ));
        assert!(page(15).iter().all(|&b| b == 0));
        let report = crate::verify::verify_region(bytes, crate::layout::BASE, 2).unwrap();
        assert!(report.ok(), "{:?}", report.lines());
        assert_eq!(report.ledger_sum, 5);
        assert_eq!(report.discarded, 1);
        assert_eq!(report.kernel_writes, 3);
    }

    #[test]
    fn hot_pages_cycle() {
        let layout = Layout::compute(32 * 4096, 4096).unwrap();
        let mut buf = PageBuf::new(layout.total_size as usize);
        let mut p = params(Profile::Zero, 2);
        p.hot_pages = 5;
        let ram = Ram::create(buf.bytes(), layout, &p).unwrap();
        let mut writers = ram.into_writers();
        let seq: Vec<u64> = (0..6).map(|_| writers[0].rewrite_next()).collect();
        assert_eq!(seq, [0, 1, 0, 1, 0, 1]);
        let seq: Vec<u64> = (0..4).map(|_| writers[1].rewrite_next()).collect();
        assert_eq!(seq, [2, 3, 4, 2]);
    }

    #[test]
    fn rejects_bad_buffers() {
        let layout = Layout::compute(32 * 4096, 4096).unwrap();
        let mut buf = PageBuf::new(16 * 4096);
        assert!(Ram::create(buf.bytes(), layout, &params(Profile::Text, 1)).is_err());
        let mut buf = PageBuf::new(33 * 4096);
        assert!(Ram::create(&mut buf.bytes()[1..], layout, &params(Profile::Text, 1)).is_err());
    }

    #[test]
    fn map_refuses_taken_range() {
        // Map somewhere unusual, then try again on top of it.
        let base = 0x5b00_0000_0000;
        let first = map_region(base, 16 * 4096).unwrap();
        first[0] = 1;
        let err = map_region(base + 4096, 4096).unwrap_err();
        assert!(err.contains("already in use"), "{err}");
    }
}
