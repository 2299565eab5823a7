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
use crate::protocol::transport::{CloseOnCancel, Closer, Reader, Writer};
use crate::protocol::{self, Control, Kind, ReadError, POSTCOPY_ROUND};
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
    /// Source addresses of the pages the image still lacks: what a
    /// resuming source must send (a page the process dropped is no longer
    /// missing there, but the image still needs it).
    image: BTreeSet<u64>,
    /// The fault thread ended: a layout change it would have read never
    /// will be, so a fill that waits for one must give up.
    faults_done: bool,
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

/// The connection post-copy runs on; replaced in place when a resuming
/// source brings a new one.
pub struct Link<'a> {
    pub reader: &'a mut BufReader<Reader>,
    pub writer: &'a mut Writer,
    pub channel: Option<(Reader, Closer)>,
}

/// Pausing a broken post-copy and recovering it over a new connection
/// (QEMU's postcopy-paused and migrate-recover): the restored process
/// keeps running (a thread that faults on a missing page waits), and a
/// source that shows the migration's `token` on `listener` within `wait`
/// finishes it.
pub struct Recovery<'a> {
    pub listener: &'a crate::protocol::transport::Listener,
    /// The receiver's cancel flag: a resumed connection is shut when it
    /// is set (a thread blocked reading it returns at once).
    pub cancel: Arc<AtomicBool>,
    pub token: u64,
    /// The source process of this migration: a resuming sender must serve
    /// that one.
    pub source_pid: u32,
    pub tls: Option<&'a crate::protocol::tls::TlsServer>,
    pub wait: Duration,
    /// The command that resumes it, for the message.
    pub hint: String,
    /// The control socket, if any: told when post-copy pauses and on
    /// which connections it runs; may add listeners while it is paused.
    pub control: &'a dyn Pausable,
}

/// What a control socket does with a post-copy that can pause: the
/// receiver's QMP handle implements it (migrate-pause, migrate-recover);
/// [`NoControl`] when there is none.
pub trait Pausable: Sync {
    /// Post-copy paused (true) or went on (false).
    fn paused(&self, _paused: bool) {}
    /// The connections post-copy runs on now, which migrate-pause shuts
    /// (empty: none, it cannot be paused).
    fn linked(&self, _link: Vec<Closer>) {}
    /// Listeners added while paused (migrate-recover): a resuming source
    /// may come on any of them too.
    fn more_listeners(&self) -> Option<&Mutex<Vec<crate::protocol::transport::Listener>>> {
        None
    }
    /// Whether the last break was asked for (migrate-pause); reading it
    /// clears it.
    fn pause_asked(&self) -> bool {
        false
    }
}

/// No control socket.
pub struct NoControl;

impl Pausable for NoControl {}

/// How receiving post-copy pages stopped short.
enum Broke {
    /// The connection broke (closed, reset, silent past the timeout):
    /// the source may come back.
    Link(String),
    /// Anything else (bad data, the source's Error, a cancel).
    Other(String),
}

impl std::fmt::Display for Broke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broke::Link(s) | Broke::Other(s) => f.write_str(s),
        }
    }
}

/// Serve the restored process until the source has sent every page; with
/// `recovery`, a broken connection pauses post-copy until a source
/// resumes it.
pub fn run(
    link: Link,
    uffd: OwnedFd,
    regions: &Regions,
    missing: &[(u64, u64)],
    timeout: Duration,
    cancel: &AtomicBool,
    recovery: Option<Recovery>,
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
        image: set.clone(),
        faults_done: false,
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
    let Link {
        reader,
        writer,
        mut channel,
    } = link;
    // The fault thread's way to the source: none while paused.
    let slot = Arc::new(Mutex::new(Some(
        writer.try_clone().map_err(|e| format!("post-copy: {e}"))?,
    )));
    let stop = Arc::new(AtomicBool::new(false));
    let faults = {
        let (shared, slot, stop) = (shared.clone(), slot.clone(), stop.clone());
        std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || {
                let r = fault_loop(&shared, &slot, &stop, ps);
                shared.lock().expect("not poisoned").faults_done = true;
                r
            })
            .map_err(|e| format!("starting the fault thread: {e}"))?
    };
    let mut pauses = 0u32;
    let mut paused = Duration::ZERO;
    // Connections that resumed it, kept open until the end (and shut on
    // cancel).
    let mut closers = Vec::new();
    let pages = loop {
        let r = receive_all(reader, channel.take(), &shared, regions, timeout, cancel);
        let e = match r {
            Ok(pages) => break Ok(pages),
            Err(Broke::Link(e)) if !cancel.load(Ordering::Relaxed) => e,
            Err(b) => break Err(b.to_string()),
        };
        let Some(rec) = recovery.as_ref().filter(|r| !r.wait.is_zero()) else {
            break Err(e);
        };
        let e = if rec.control.pause_asked() {
            "paused by migrate-pause".to_string()
        } else {
            e
        };
        *slot.lock().expect("not poisoned") = None;
        eprintln!(
            "procmig recv: post-copy paused: {e}. The restored process runs on (a thread that needs a missing page waits); waiting {} for the source: {}",
            crate::units::human_duration(rec.wait),
            rec.hint
        );
        rec.control.paused(true);
        let t = Instant::now();
        let resumed = recover(rec, &shared, regions, timeout, cancel);
        paused += t.elapsed();
        let (r, w, closer) = match resumed {
            Ok(c) => c,
            Err(why) => break Err(format!("{e}; {why}")),
        };
        pauses += 1;
        *reader = BufReader::with_capacity(1 << 20, r);
        *writer = match w.try_clone() {
            Ok(c) => c,
            Err(e) => break Err(format!("post-copy: {e}")),
        };
        rec.control.linked(vec![closer.clone()]);
        closers.push(CloseOnCancel::new(rec.cancel.clone(), closer));
        // Ask again for what threads wait on, then let the fault thread
        // ask on the new connection (under its lock, so no request falls
        // in between).
        let mut guard = slot.lock().expect("not poisoned");
        let asked: Vec<u64> = shared
            .lock()
            .expect("not poisoned")
            .asked
            .keys()
            .copied()
            .collect();
        let mut w = w;
        for addr in asked {
            let _ = protocol::write_control(&mut w, &Control::PageRequest { addr, pages: 1 });
        }
        *guard = Some(w);
        drop(guard);
        rec.control.paused(false);
        eprintln!("procmig recv: post-copy resumed");
    };
    if let Some(rec) = &recovery {
        rec.control.linked(Vec::new());
    }
    stop.store(true, Ordering::Relaxed);
    let fault_result = faults
        .join()
        .unwrap_or_else(|_| Err("fault thread panicked".into()));
    let pages = pages?;
    fault_result?;
    let m = shared.lock().expect("not poisoned");
    let mut report =
        PostcopyReport::new(pages, m.latencies_us.clone(), m.zero_filled, t0.elapsed());
    report.pauses = pauses;
    report.paused_ms = paused.as_secs_f64() * 1000.0;
    report.forked = m.next_id - 1;
    Ok(report)
}

/// Read the main connection (and the preempt channel, when there is one)
/// to their PostcopyDone; returns the pages the source says it sent.
fn receive_all(
    reader: &mut BufReader<Reader>,
    channel: Option<(Reader, Closer)>,
    shared: &Mutex<Missing>,
    regions: &Regions,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<u64, Broke> {
    let (r, answered) = std::thread::scope(|s| {
        // The channel has no frame deadline: it is silent while nothing
        // faults (TCP keepalive and TCP_USER_TIMEOUT watch the link).
        let side = channel.map(|(ch, closer)| {
            let h = s.spawn(move || {
                let mut ch = BufReader::with_capacity(1 << 20, ch);
                receive(&mut ch, shared, regions, None, cancel)
            });
            (h, closer)
        });
        let r = receive(reader, shared, regions, Some(timeout), cancel);
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
                .unwrap_or_else(|_| Err(Broke::Other("the channel thread panicked".into())))
        });
        (r, answered)
    });
    let pages = r?;
    match answered {
        Some(Err(Broke::Link(e))) => Err(Broke::Link(format!("preempt channel: {e}"))),
        Some(Err(Broke::Other(e))) => Err(Broke::Other(format!("preempt channel: {e}"))),
        _ => Ok(pages),
    }
}

/// Paused: wait for a source that shows the token, and tell it what is
/// still missing: the region table, the pages the image still lacks (a
/// superset of what every process lacks) as Discard frames, then
/// RoundEnd(0xFFFFFFFF).
fn recover(
    rec: &Recovery,
    shared: &Mutex<Missing>,
    regions: &Regions,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<(Reader, Writer, Closer), String> {
    let token = rec.token;
    let is_it = |c: &Control| matches!(c, Control::Resume { token: t, .. } if *t == token);
    let deadline = Instant::now() + rec.wait;
    let (reader, mut writer, closer) = loop {
        let (r, mut w, c, frame) = super::gate::accept_tagged(
            (rec.listener, rec.control.more_listeners()),
            deadline,
            timeout,
            rec.tls,
            cancel,
            is_it,
        )
        .map_err(|e| match e {
            super::gate::Tagged::Cancelled => "cancelled by signal while paused".to_string(),
            super::gate::Tagged::Failed(e) => format!(
                "no source resumed post-copy within --recover-timeout {} ({e})",
                crate::units::human_duration(rec.wait)
            ),
        })?;
        // `is_it` let only a Resume through.
        let Control::Resume { pid, .. } = frame else {
            continue;
        };
        if pid == rec.source_pid {
            break (r, w, c);
        }
        // The right token with another process would fill the restored
        // process with a stranger's memory.
        let message = format!(
            "this paused migration is of process {} on the source, not {}",
            rec.source_pid, pid
        );
        eprintln!("procmig recv: refused a resuming source: {message}");
        let _ = protocol::write_control(
            &mut w,
            &Control::Error {
                code: protocol::error_code::FAILED,
                message,
            },
        );
    };
    let ps = regions.page_size;
    let pages: BTreeSet<u64> = shared.lock().expect("not poisoned").image.clone();
    let send = |w: &mut Writer, c: &Control| {
        protocol::write_control(w, c).map_err(|e| format!("telling the resuming source: {e}"))
    };
    let table = regions.files.iter().map(|f| f.entry.clone()).collect();
    send(&mut writer, &Control::Regions(table))?;
    for (i, rf) in regions.files.iter().enumerate() {
        let mut runs = Vec::new();
        for &a in pages.range(rf.entry.start..rf.entry.end) {
            crate::pages::push_run(&mut runs, (a - rf.entry.start) / ps, 1);
        }
        for runs in runs.chunks(protocol::MAX_ZERO_RUNS as usize) {
            let region = i as u32;
            let runs = runs.to_vec();
            send(&mut writer, &Control::Discard { region, runs })?;
        }
    }
    send(&mut writer, &Control::RoundEnd(POSTCOPY_ROUND))?;
    Ok((reader, writer, closer))
}

/// Read the source's post-copy frames until PostcopyDone, each within
/// `timeout` when given; returns the pages it says it sent.
fn receive(
    reader: &mut BufReader<Reader>,
    shared: &Mutex<Missing>,
    regions: &Regions,
    timeout: Option<Duration>,
    cancel: &AtomicBool,
) -> Result<u64, Broke> {
    let ps = regions.page_size;
    let mut d = Decompressor::new().map_err(|e| Broke::Other(e.to_string()))?;
    let mut buf = Vec::new();
    let mut raw = Vec::new();
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(Broke::Other("cancelled by signal".into()));
        }
        reader
            .get_mut()
            .set_deadline(timeout.map(|t| Instant::now() + t));
        let kind = protocol::read_frame(reader, &mut buf).map_err(|e| match e {
            ReadError::Decode(d) => Broke::Other(d.to_string()),
            e => Broke::Link(e.to_string()),
        })?;
        let (region, runs, data): (u32, Vec<protocol::Run>, Option<&[u8]>) = if kind == Kind::Pages
        {
            let h = protocol::decode_pages_header(&buf, ps as u32)
                .map_err(|e| Broke::Other(e.to_string()))?;
            if h.round != POSTCOPY_ROUND {
                return Err(Broke::Other(format!(
                    "Pages frame of round {} during post-copy",
                    h.round
                )));
            }
            raw.resize(h.raw_len as usize, 0);
            d.decompress(h.codec, &buf[h.data_offset..], &mut raw)
                .map_err(|e| Broke::Other(e.to_string()))?;
            if xxhash_rust::xxh3::xxh3_64(&raw) != h.raw_xxh3 {
                return Err(Broke::Other(format!(
                    "checksum mismatch in region {}",
                    h.region
                )));
            }
            (h.region, h.runs, Some(&raw[..]))
        } else {
            match Control::decode(kind, &buf).map_err(|e| Broke::Other(e.to_string()))? {
                Control::Zero {
                    round,
                    region,
                    runs,
                } if round == POSTCOPY_ROUND => (region, runs, None),
                Control::PostcopyDone { pages } => return Ok(pages),
                Control::Error { message, .. } => {
                    return Err(Broke::Other(format!("source aborted: {message}")))
                }
                other => {
                    return Err(Broke::Other(format!(
                        "unexpected {:?} frame during post-copy",
                        other.kind()
                    )))
                }
            }
        };
        let rf = regions
            .files
            .get(region as usize)
            .ok_or_else(|| Broke::Other(format!("post-copy frame names region {region}")))?;
        let mut off = 0usize;
        for run in &runs {
            if run.first + run.count as u64 > rf.pages {
                return Err(Broke::Other(format!(
                    "post-copy pages outside region {region}"
                )));
            }
            let (n, len) = (run.count as u64, run.count as usize * ps as usize);
            let bytes = match data {
                Some(raw) if raw.len() >= off + len => Some(&raw[off..off + len]),
                Some(_) => return Err(Broke::Other("a Pages frame shorter than its runs".into())),
                None => None,
            };
            off += len;
            let src = rf.entry.start + run.first * ps;
            fill(shared, src, n, bytes, ps, (rf, run.first * ps)).map_err(Broke::Other)?;
        }
    }
}

/// Put a run of `n` arriving pages (source address `src`; `data` None:
/// zero pages) into the image at `image` (region file, offset; the file is
/// the image of the process at the switch, complete once every page
/// arrived), and into every process still missing them: one UFFDIO_COPY
/// per stretch that is missing and contiguous there.
fn fill(
    shared: &Mutex<Missing>,
    src: u64,
    n: u64,
    data: Option<&[u8]>,
    ps: u64,
    image: (&super::staging::RegionFile, u64),
) -> Result<(), String> {
    // Each page arrives once per connection with the stopped source's
    // bytes, so the image needs no ordering with the processes.
    let len = (n * ps) as usize;
    // SAFETY: the run lies inside the region (checked by the caller), so
    // inside its mapping.
    let at = unsafe { image.0.ptr().add(image.1 as usize) };
    let first = image.1 / ps;
    match data {
        Some(d) => {
            // SAFETY: `at` has `len` writable bytes; `d` is `len` long.
            unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), at, len) };
            image.0.record(first, d);
        }
        None => {
            // SAFETY: as above.
            unsafe { std::ptr::write_bytes(at, 0, len) };
            image.0.forget(first, n);
        }
    }
    loop {
        let mut m = shared.lock().expect("not poisoned");
        let mut again = false;
        let mut exited = Vec::new();
        for (k, p) in m.procs.iter_mut().enumerate() {
            match fill_proc(p, src, n, data, ps)? {
                Filled::Again => again = true,
                Filled::Exited => exited.push(k),
                _ => {}
            }
        }
        // A forked child that exited needs nothing more (the restored
        // process itself is watched by the session).
        for k in exited.into_iter().rev().filter(|&k| k > 0) {
            m.procs.remove(k);
        }
        if again {
            if m.faults_done {
                return Err("a layout change is pending and the fault thread has stopped".into());
            }
            // An event is pending: let the fault thread read it.
            drop(m);
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        for i in 0..n {
            m.image.remove(&(src + i * ps));
            if let Some(t) = m.asked.remove(&(src + i * ps)) {
                m.latencies_us.push(t.elapsed().as_micros() as u64);
            }
        }
        return Ok(());
    }
}

/// [`fill`] for one process: the pages of the run it still misses, in
/// stretches contiguous where they are now. Again or Exited when the
/// process needs another try or is gone; pages filled leave its set.
fn fill_proc(
    p: &mut Proc,
    src: u64,
    n: u64,
    data: Option<&[u8]>,
    ps: u64,
) -> Result<Filled, String> {
    let fd = p.fd.as_raw_fd();
    let one = |at: u64, i: u64, len: u64| {
        match data {
            None => userfault::zeropage(fd, at, len * ps),
            Some(d) => userfault::copy(fd, at, &d[(i * ps) as usize..((i + len) * ps) as usize]),
        }
        .map_err(|e| format!("filling {at:#x}: {e}"))
    };
    let mut i = 0;
    while i < n {
        let s = src + i * ps;
        if !p.pages.contains(&s) {
            i += 1;
            continue;
        }
        let at = p.now(s);
        let mut j = i + 1;
        while j < n && p.pages.contains(&(src + j * ps)) && p.now(src + j * ps) == at + (j - i) * ps
        {
            j += 1;
        }
        match one(at, i, j - i)? {
            Filled::Done => {}
            r @ (Filled::Again | Filled::Exited) => return Ok(r),
            // Some of the stretch was there already, or is gone: page by
            // page (a page there already is woken and counts as filled).
            _ => {
                for q in i..j {
                    match one(p.now(src + q * ps), q, 1)? {
                        r @ (Filled::Again | Filled::Exited) => return Ok(r),
                        _ => {
                            p.pages.remove(&(src + q * ps));
                        }
                    }
                }
            }
        }
        for q in i..j {
            p.pages.remove(&(src + q * ps));
        }
        i = j;
    }
    Ok(Filled::Done)
}

fn fault_loop(
    shared: &Mutex<Missing>,
    slot: &Mutex<Option<Writer>>,
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
        if ask.is_empty() {
            continue;
        }
        // No way to the source (post-copy paused): the requests stay in
        // `asked` and are made again on the new connection.
        let mut w = slot.lock().expect("not poisoned");
        for &src in &ask {
            let Some(writer) = w.as_mut() else { break };
            let request = Control::PageRequest {
                addr: src,
                pages: 1,
            };
            if protocol::write_control(writer, &request).is_err() {
                *w = None;
            }
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
