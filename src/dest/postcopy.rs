//! Post-copy, destination side: the restored process runs while the pages
//! it lacks arrive. Its private anonymous memory is registered with a
//! userfaultfd (made inside it by the restorer) for missing pages.
//!
//! - The fault thread reads the userfaultfd: a fault on a page still
//!   missing asks the source for it (PageRequest); a fault on a page that
//!   is not missing (never populated on the source, or dropped by the
//!   process since) gets the zero page. MADV_DONTNEED and munmap (remove,
//!   unmap events) make pages no longer missing, so data arriving later is
//!   not put back over a page the process dropped; mremap (remap event)
//!   moves pages, and arriving pages follow them.
//! - The main thread reads frames (answers to faults and the background
//!   push, in any order), writes each page into the image and, if it is
//!   still missing, into the process with UFFDIO_COPY (which wakes the
//!   threads waiting on it). With a preempt channel (version 4), a second
//!   thread does the same with the answers, which then never wait behind
//!   background data; the source sends each page once, on one of the two.
//!
//! Both hold one lock while they touch the missing set and the process's
//! memory, so a page dropped by the process is never filled afterwards.

use std::collections::{BTreeSet, HashMap};
use std::io::BufReader;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::workers::Regions;
use crate::codec::Decompressor;
use crate::protocol::transport::{Closer, Reader, Writer};
use crate::protocol::{self, Control, Kind, POSTCOPY_ROUND};
use crate::stats::PostcopyReport;
use crate::userfault::{self, Event, Filled};

/// One process whose memory is being filled: the restored one, and any
/// child it forks meanwhile (UFFD_EVENT_FORK gives each its own
/// userfaultfd, and its own copy of what is missing).
struct Proc {
    /// Unique for the session: indexes shift when an exited child is
    /// dropped, and descriptor numbers are reused.
    id: u64,
    fd: OwnedFd,
    /// Source addresses of the pages still missing.
    pages: BTreeSet<u64>,
    /// mremap events since the switch, in order: (from, to, len).
    remaps: Vec<(u64, u64, u64)>,
}

struct Missing {
    procs: Vec<Proc>,
    /// The id the next forked child gets.
    next_id: u64,
    /// When each outstanding request was sent.
    asked: HashMap<u64, Instant>,
    latencies_us: Vec<u64>,
    zero_filled: u64,
}

impl Proc {
    /// Where the page at source address `a` is now.
    fn now(&self, mut a: u64) -> u64 {
        for &(from, to, len) in &self.remaps {
            if from <= a && a < from + len {
                a = to + (a - from);
            }
        }
        a
    }

    /// The source address of the page now at `a`.
    fn source(&self, mut a: u64) -> u64 {
        for &(from, to, len) in self.remaps.iter().rev() {
            if to <= a && a < to + len {
                a = from + (a - to);
            }
        }
        a
    }

    fn forget(&mut self, start: u64, end: u64, ps: u64) {
        let mut a = start;
        while a < end {
            let s = self.source(a);
            self.pages.remove(&s);
            a += ps;
        }
    }
}

/// Serve the restored process until the source has sent every page.
#[allow(clippy::too_many_arguments)]
pub fn run(
    reader: &mut BufReader<Reader>,
    channel: Option<(Reader, Closer)>,
    writer: Writer,
    uffd: OwnedFd,
    regions: &Regions,
    missing: &[(u64, u64)],
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<PostcopyReport, String> {
    let ps = regions.page_size;
    let t0 = Instant::now();
    let mut set = BTreeSet::new();
    for &(s, e) in missing {
        let mut a = s;
        while a < e {
            set.insert(a);
            a += ps;
        }
    }
    let shared = Arc::new(Mutex::new(Missing {
        procs: vec![Proc {
            id: 0,
            fd: uffd,
            pages: set,
            remaps: Vec::new(),
        }],
        next_id: 1,
        asked: HashMap::new(),
        latencies_us: Vec::new(),
        zero_filled: 0,
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let faults = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || fault_loop(&shared, writer, &stop, ps))
            .map_err(|e| format!("starting the fault thread: {e}"))?
    };
    let (r, answered) = std::thread::scope(|s| {
        // The channel has no frame deadline: it is silent while nothing
        // faults (TCP keepalive and TCP_USER_TIMEOUT watch the link).
        let side = channel.map(|(ch, closer)| {
            let shared = &shared;
            let h = s.spawn(move || {
                let mut ch = BufReader::with_capacity(1 << 20, ch);
                receive(&mut ch, shared, regions, None, cancel)
            });
            (h, closer)
        });
        let r = receive(reader, &shared, regions, Some(timeout), cancel);
        let answered = side.map(|(h, closer)| {
            // The source ends the channel before the main connection: it
            // has little left to say; if the main one broke, stop it.
            let deadline = Instant::now() + timeout;
            while r.is_ok() && !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !h.is_finished() {
                closer.close();
            }
            h.join()
                .unwrap_or_else(|_| Err("the channel thread panicked".into()))
        });
        (r, answered)
    });
    stop.store(true, Ordering::Relaxed);
    let fault_result = faults
        .join()
        .unwrap_or_else(|_| Err("fault thread panicked".into()));
    let pages = r?;
    if let Some(a) = answered {
        a.map_err(|e| format!("preempt channel: {e}"))?;
    }
    fault_result?;
    let m = shared.lock().expect("not poisoned");
    Ok(PostcopyReport::new(
        pages,
        m.latencies_us.clone(),
        m.zero_filled,
        t0.elapsed(),
    ))
}

/// Read the source's post-copy frames until PostcopyDone, each within
/// `timeout` when given; returns the pages it says it sent.
fn receive(
    reader: &mut BufReader<Reader>,
    shared: &Mutex<Missing>,
    regions: &Regions,
    timeout: Option<Duration>,
    cancel: &AtomicBool,
) -> Result<u64, String> {
    let ps = regions.page_size;
    let mut d = Decompressor::new().map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut raw = Vec::new();
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err("cancelled by signal".into());
        }
        reader
            .get_mut()
            .set_deadline(timeout.map(|t| Instant::now() + t));
        let kind = protocol::read_frame(reader, &mut buf).map_err(|e| e.to_string())?;
        let (region, runs, data): (u32, Vec<protocol::Run>, Option<&[u8]>) = if kind == Kind::Pages
        {
            let h = protocol::decode_pages_header(&buf, ps as u32).map_err(|e| e.to_string())?;
            if h.round != POSTCOPY_ROUND {
                return Err(format!("Pages frame of round {} during post-copy", h.round));
            }
            raw.resize(h.raw_len as usize, 0);
            d.decompress(h.codec, &buf[h.data_offset..], &mut raw)
                .map_err(|e| e.to_string())?;
            if xxhash_rust::xxh3::xxh3_64(&raw) != h.raw_xxh3 {
                return Err(format!("checksum mismatch in region {}", h.region));
            }
            (h.region, h.runs, Some(&raw[..]))
        } else {
            match Control::decode(kind, &buf).map_err(|e| e.to_string())? {
                Control::Zero {
                    round,
                    region,
                    runs,
                } if round == POSTCOPY_ROUND => (region, runs, None),
                Control::PostcopyDone { pages } => return Ok(pages),
                Control::Error { message, .. } => return Err(format!("source aborted: {message}")),
                other => {
                    return Err(format!(
                        "unexpected {:?} frame during post-copy",
                        other.kind()
                    ))
                }
            }
        };
        let rf = regions
            .files
            .get(region as usize)
            .ok_or_else(|| format!("post-copy frame names region {region}"))?;
        let mut off = 0usize;
        for run in &runs {
            if run.first + run.count as u64 > rf.pages {
                return Err(format!("post-copy pages outside region {region}"));
            }
            for p in run.first..run.first + run.count as u64 {
                let page: &[u8] = match data {
                    Some(raw) => &raw[off..off + ps as usize],
                    None => &[],
                };
                off += ps as usize;
                // SAFETY: p < rf.pages, so the page lies inside the mapping.
                let image = unsafe { rf.ptr().add((p * ps) as usize) };
                fill(shared, rf.entry.start + p * ps, page, ps, image)?;
            }
        }
    }
}

/// Put one arriving page into the image at `image` (the file is the
/// image of the process at the switch, complete once every page arrived)
/// and into every process still missing it.
fn fill(
    shared: &Mutex<Missing>,
    src: u64,
    page: &[u8],
    ps: u64,
    image: *mut u8,
) -> Result<(), String> {
    let mut imaged = false;
    loop {
        let mut m = shared.lock().expect("not poisoned");
        if !imaged {
            // SAFETY: `image` is a page inside a region file's mapping
            // (checked by the caller), and every writer of the files in
            // post-copy holds this lock.
            unsafe {
                if page.is_empty() {
                    std::ptr::write_bytes(image, 0, ps as usize);
                } else {
                    std::ptr::copy_nonoverlapping(page.as_ptr(), image, ps as usize);
                }
            }
            imaged = true;
        }
        let mut again = false;
        let mut exited = Vec::new();
        for (k, p) in m.procs.iter_mut().enumerate() {
            if !p.pages.contains(&src) {
                continue;
            }
            let at = p.now(src);
            let fd = p.fd.as_raw_fd();
            let r = if page.is_empty() {
                userfault::zeropage(fd, at, ps)
            } else {
                userfault::copy(fd, at, page)
            }
            .map_err(|e| format!("filling {at:#x}: {e}"))?;
            match r {
                Filled::Again => again = true,
                Filled::Exited => exited.push(k),
                _ => {
                    p.pages.remove(&src);
                }
            }
        }
        // A forked child that exited needs nothing more (the restored
        // process itself is watched by the session).
        for k in exited.into_iter().rev().filter(|&k| k > 0) {
            m.procs.remove(k);
        }
        if again {
            // An event is pending: let the fault thread read it.
            drop(m);
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        if let Some(t) = m.asked.remove(&src) {
            m.latencies_us.push(t.elapsed().as_micros() as u64);
        }
        return Ok(());
    }
}

fn fault_loop(
    shared: &Mutex<Missing>,
    mut writer: Writer,
    stop: &AtomicBool,
    ps: u64,
) -> Result<(), String> {
    let mut events = Vec::new();
    let mut ask = Vec::new();
    // Zero-page fills refused while the layout changed: retried, per
    // process (by id: an index would point at another process once an
    // exited child is dropped, and zero a page that one still lacks).
    let mut retry: Vec<(u64, u64)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut pfds: Vec<libc::pollfd> = shared
            .lock()
            .expect("not poisoned")
            .procs
            .iter()
            .map(|p| libc::pollfd {
                fd: p.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: the pollfds live across the call.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 20) };
        ask.clear();
        let mut m = shared.lock().expect("not poisoned");
        let mut k = 0;
        while k < m.procs.len() {
            events.clear();
            let fd = m.procs[k].fd.as_raw_fd();
            let id = m.procs[k].id;
            userfault::read_events(fd, &mut events).map_err(|e| format!("reading faults: {e}"))?;
            events.extend(
                retry
                    .iter()
                    .filter(|(j, _)| *j == id)
                    .map(|&(_, addr)| Event::Fault { addr }),
            );
            retry.retain(|(j, _)| *j != id);
            for &ev in &events {
                match ev {
                    Event::Fault { addr } => {
                        let at = addr & !(ps - 1);
                        let src = m.procs[k].source(at);
                        if m.procs[k].pages.contains(&src) {
                            if let std::collections::hash_map::Entry::Vacant(e) = m.asked.entry(src)
                            {
                                e.insert(Instant::now());
                                ask.push(src);
                            }
                        } else {
                            // Not missing: never populated on the source,
                            // or dropped by the process since: zero.
                            let r = userfault::zeropage(fd, at, ps)
                                .map_err(|e| format!("zero page at {at:#x}: {e}"))?;
                            if r == Filled::Again {
                                retry.push((id, at));
                            } else {
                                m.zero_filled += 1;
                            }
                        }
                    }
                    Event::Remove { start, end } | Event::Unmap { start, end } => {
                        m.procs[k].forget(start, end, ps)
                    }
                    Event::Remap { from, to, len } => m.procs[k].remaps.push((from, to, len)),
                    Event::Fork { ufd } => {
                        // SAFETY: the kernel installed this descriptor in
                        // our table for the child; it is ours alone.
                        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ufd) };
                        let child = Proc {
                            id: m.next_id,
                            fd,
                            pages: m.procs[k].pages.clone(),
                            remaps: m.procs[k].remaps.clone(),
                        };
                        m.next_id += 1;
                        m.procs.push(child);
                    }
                    Event::Other(_) => {}
                }
            }
            k += 1;
        }
        drop(m);
        for &src in &ask {
            protocol::write_control(
                &mut writer,
                &Control::PageRequest {
                    addr: src,
                    pages: 1,
                },
            )
            .map_err(|e| format!("asking for a page: {e}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing(pages: &[u64]) -> Proc {
        // SAFETY: a fresh descriptor of our own (any will do here).
        let fd = unsafe { libc::eventfd(0, 0) };
        Proc {
            id: 0,
            // SAFETY: as above.
            fd: unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            pages: pages.iter().copied().collect(),
            remaps: Vec::new(),
        }
    }

    #[test]
    fn remapped_pages_are_followed_both_ways() {
        let mut m = missing(&[0x10000, 0x11000, 0x20000]);
        // mremap of [0x10000, 0x12000) to 0x50000, then of 0x50000 on to 0x90000.
        m.remaps.push((0x10000, 0x50000, 0x2000));
        m.remaps.push((0x50000, 0x90000, 0x1000));
        assert_eq!(m.now(0x10000), 0x90000);
        assert_eq!(m.now(0x11000), 0x51000);
        assert_eq!(m.now(0x20000), 0x20000);
        assert_eq!(m.source(0x90000), 0x10000);
        assert_eq!(m.source(0x51000), 0x11000);
        assert_eq!(m.source(0x20000), 0x20000);
    }

    #[test]
    fn dropped_pages_are_no_longer_missing() {
        let mut m = missing(&[0x10000, 0x11000, 0x12000]);
        m.remaps.push((0x10000, 0x70000, 0x3000));
        // MADV_DONTNEED of the middle page, at its new address.
        m.forget(0x71000, 0x72000, 0x1000);
        assert_eq!(
            m.pages.iter().copied().collect::<Vec<_>>(),
            vec![0x10000, 0x12000]
        );
    }
}
