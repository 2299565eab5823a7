//! Post-copy, source side: after the handover the process runs on the
//! destination and the stopped source serves what it still lacks. Pages
//! the destination faults on are asked for (PageRequest) and sent before
//! anything else; meanwhile every missing page is pushed in the
//! background, each page once. With a preempt channel (version 4) the
//! answers go on that connection of their own and never queue behind the
//! background push (QEMU's postcopy-preempt); without one, the send buffer
//! is kept small so that an answer waits behind little background data.
//! After an answer the background scan goes on just after the faulted
//! pages, where the process is likely to touch next.

use std::io::{BufReader, Write};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::SendError;
use crate::codec::{Compression, Compressor};
use crate::pages::{PageSet, Run};
use crate::process::MemReader;
use crate::protocol::transport::{Reader, Writer};
use crate::protocol::{self, Control, POSTCOPY_ROUND};

/// Pages per background frame.
const BATCH: u64 = 32;
/// Pages per background frame when answers to faults have a connection of
/// their own (they never wait behind background frames there).
const BATCH_BESIDE_CHANNEL: u64 = 256;
/// Pages sent with a faulted page: it and the missing ones after it.
const NEIGHBOURHOOD: u64 = 8;
/// Kernel send buffer during post-copy: ~2 ms at 1 Gbit/s.
const SEND_BUFFER: i32 = 256 << 10;

/// A region with the pages the destination is missing.
pub struct Missing {
    pub index: u32,
    pub start: u64,
    pub end: u64,
    pub runs: Vec<Run>,
}

/// What the destination sent back during post-copy.
enum Msg {
    Request(u64, u32),
    Answer(Control),
    Broken(String),
}

pub use crate::stats::PostcopySent as Served;

pub struct Server<'a> {
    pub mem: &'a MemReader,
    pub page_size: u64,
    pub missing: Vec<Missing>,
    pub method: Compression,
    pub level: i32,
    /// `--max-bandwidth` for the background push (answers to faults are
    /// never held back).
    pub max_bandwidth: Option<u64>,
    /// Compression workers for the background push (answers to faults
    /// are compressed by the serving thread, at once).
    pub threads: usize,
}

impl Server<'_> {
    /// Serve until every missing page is sent, then wait for the answer to
    /// PostcopyDone (Ack or Error) within `answer_timeout`.
    pub fn run(
        self,
        reader: Reader,
        mut writer: Writer,
        mut answers: Option<Writer>,
        answer_timeout: Duration,
    ) -> Result<(Control, Served, Writer), SendError> {
        let _ = writer.set_send_buffer(SEND_BUFFER);
        if let Some(a) = &answers {
            let _ = a.set_send_buffer(SEND_BUFFER);
        }
        let rx = spawn_reader(reader);
        let (method, level) = match self.method {
            Compression::Auto => (Compression::Zstd, 1),
            m => (m, self.level),
        };
        let mut comp = Compressor::new(method, level)?;
        let ps = self.page_size;
        let mut sent: Vec<PageSet> = self.missing.iter().map(|_| PageSet::default()).collect();
        let mut served = Served {
            preempt_channel: answers.is_some(),
            ..Served::default()
        };
        // Pages that went on the channel: it says so at its end.
        let mut answered = 0u64;
        let mut frame = Vec::new();
        let mut raw = Vec::new();
        let broken = |e: std::io::Error| SendError::Connection(format!("post-copy: {e}"));
        let channel_broken =
            |e: std::io::Error| SendError::Connection(format!("post-copy, preempt channel: {e}"));
        // Background cursor: (region, run, page within run).
        let mut cursor = (0usize, 0usize, 0u64);
        let t0 = Instant::now();
        let mut background = 0u64;
        // The background push's compression workers.
        let threads = self.threads.max(1);
        let batch = if answers.is_some() {
            BATCH_BESIDE_CHANNEL
        } else {
            BATCH
        };
        let comps = (0..threads)
            .map(|_| Compressor::new(method, level))
            .collect::<Result<Vec<_>, _>>()?;
        let this = &self;
        std::thread::scope(|scope| -> Result<(), SendError> {
            let (job_tx, job_rx) = crossbeam_channel::bounded::<(usize, Vec<Run>)>(threads);
            let (out_tx, out_rx) =
                crossbeam_channel::bounded::<std::io::Result<(Vec<u8>, u64)>>(threads * 2);
            for mut c in comps {
                let (job_rx, out_tx) = (job_rx.clone(), out_tx.clone());
                scope.spawn(move || {
                    let mut raw = Vec::new();
                    for (i, runs) in job_rx.iter() {
                        let mut f = Vec::new();
                        let r = this
                            .encode(i, &runs, &mut c, &mut f, &mut raw)
                            .map(|p| (f, p));
                        if out_tx.send(r).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(out_tx);
            drop(job_rx);
            let mut in_flight = 0usize;
            let r = (|| -> Result<(), SendError> {
                loop {
                    // Faults first; while the background is over its rate, wait
                    // for them.
                    loop {
                        let wait = self.max_bandwidth.map_or(Duration::ZERO, |rate| {
                            Duration::from_secs_f64(background as f64 / rate as f64)
                                .saturating_sub(t0.elapsed())
                        });
                        let msg = if wait.is_zero() {
                            rx.try_recv().ok()
                        } else {
                            rx.recv_timeout(wait.min(Duration::from_millis(20))).ok()
                        };
                        let Some(msg) = msg else {
                            if wait.is_zero() {
                                break;
                            }
                            continue;
                        };
                        match msg {
                            Msg::Request(addr, n) => {
                                served.requests += 1;
                                let Some(i) = self
                                    .missing
                                    .iter()
                                    .position(|m| m.start <= addr && addr < m.end)
                                else {
                                    continue;
                                };
                                let m = &self.missing[i];
                                let first = (addr - m.start) / ps;
                                let pages = m.end.saturating_sub(m.start) / ps;
                                let mut want = Vec::new();
                                let upto = (first + (n as u64).max(NEIGHBOURHOOD)).min(pages);
                                for p in first..upto {
                                    if !sent[i].contains(p) && (p == first || in_runs(&m.runs, p)) {
                                        crate::pages::push_run(&mut want, p, 1);
                                    }
                                }
                                served.requested_pages += 1;
                                let before = served.pages;
                                self.send(
                                    i,
                                    &want,
                                    &mut sent,
                                    &mut comp,
                                    &mut frame,
                                    &mut raw,
                                    answers.as_mut().unwrap_or(&mut writer),
                                    &mut served,
                                )
                                .map_err(|e| {
                                    if answers.is_some() {
                                        channel_broken(e)
                                    } else {
                                        broken(e)
                                    }
                                })?;
                                if answers.is_some() {
                                    answered += served.pages - before;
                                }
                                // Only forwards: going back would walk pages
                                // already sent again.
                                cursor = cursor.max(after(&m.runs, i, upto));
                            }
                            Msg::Answer(Control::Error { message, .. }) => {
                                return Err(SendError::Remote(message))
                            }
                            Msg::Answer(other) => {
                                return Err(SendError::BadAck(format!(
                                    "{:?} during post-copy",
                                    other.kind()
                                )))
                            }
                            Msg::Broken(e) => return Err(SendError::Connection(e)),
                        }
                    }
                    // Then background batches: the pool kept fed, one finished
                    // frame written (a short wait, so that faults stay first).
                    while in_flight < 2 * threads {
                        let Some((i, batch)) = self.next_batch(&mut cursor, &sent, batch) else {
                            break;
                        };
                        for r in &batch {
                            sent[i].insert_run(r.first, r.count as u64);
                        }
                        job_tx.send((i, batch)).map_err(|_| {
                            SendError::Connection("post-copy: workers stopped".into())
                        })?;
                        in_flight += 1;
                    }
                    if in_flight == 0 {
                        break;
                    }
                    let r = match out_rx.recv_timeout(Duration::from_millis(5)) {
                        Ok(r) => Some(r),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                            return Err(SendError::Connection(
                                "post-copy: the compression workers stopped".into(),
                            ))
                        }
                    };
                    if let Some(r) = r {
                        in_flight -= 1;
                        let (f, pages) = r.map_err(broken)?;
                        writer
                            .write_all(&f)
                            .and_then(|_| writer.flush())
                            .map_err(broken)?;
                        served.pages += pages;
                        served.bytes += f.len() as u64;
                        background += f.len() as u64;
                    }
                }
                Ok(())
            })();
            drop(job_tx);
            drop(out_rx);
            r
        })?;
        // The channel's end first: the destination takes the main
        // connection's PostcopyDone as the end of both.
        if let Some(a) = answers.as_mut() {
            protocol::write_control(a, &Control::PostcopyDone { pages: answered })
                .map_err(channel_broken)?;
        }
        protocol::write_control(
            &mut writer,
            &Control::PostcopyDone {
                pages: served.pages,
            },
        )
        .map_err(broken)?;
        let deadline = Instant::now() + answer_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Msg::Request(..)) => {} // late: everything was sent
                Ok(Msg::Answer(Control::Error { message, .. })) => {
                    return Err(SendError::Remote(message))
                }
                Ok(Msg::Answer(c)) => return Ok((c, served, writer)),
                Ok(Msg::Broken(e)) => return Err(SendError::Connection(e)),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(SendError::Connection(
                        "no answer to PostcopyDone within the --timeout".into(),
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(SendError::Connection("connection closed".into()))
                }
            }
        }
    }

    /// Up to `batch` missing pages not sent yet, from the cursor on, and
    /// from the start again at the end (an answer moves the cursor ahead
    /// of pages not sent yet); `None` once a whole pass finds none.
    fn next_batch(
        &self,
        cursor: &mut (usize, usize, u64),
        sent: &[PageSet],
        batch: u64,
    ) -> Option<(usize, Vec<Run>)> {
        for _pass in 0..2 {
            if let Some(b) = self.scan(cursor, sent, batch) {
                return Some(b);
            }
            *cursor = (0, 0, 0);
        }
        None
    }

    fn scan(
        &self,
        cursor: &mut (usize, usize, u64),
        sent: &[PageSet],
        batch: u64,
    ) -> Option<(usize, Vec<Run>)> {
        while cursor.0 < self.missing.len() {
            let m = &self.missing[cursor.0];
            while cursor.1 < m.runs.len() {
                let r = m.runs[cursor.1];
                let mut out = Vec::new();
                let mut n = 0;
                while cursor.2 < r.count as u64 && n < batch {
                    let p = r.first + cursor.2;
                    cursor.2 += 1;
                    if !sent[cursor.0].contains(p) {
                        crate::pages::push_run(&mut out, p, 1);
                        n += 1;
                    }
                }
                if cursor.2 >= r.count as u64 {
                    cursor.1 += 1;
                    cursor.2 = 0;
                }
                if !out.is_empty() {
                    return Some((cursor.0, out));
                }
            }
            cursor.0 += 1;
            cursor.1 = 0;
            cursor.2 = 0;
        }
        None
    }

    /// Read the pages of `runs` in missing region `i` from the stopped
    /// process and send them: zero pages as Zero, the rest as one Pages
    /// frame per run group.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        i: usize,
        runs: &[Run],
        sent: &mut [PageSet],
        comp: &mut Compressor,
        frame: &mut Vec<u8>,
        raw: &mut Vec<u8>,
        w: &mut Writer,
        served: &mut Served,
    ) -> std::io::Result<()> {
        for r in runs {
            sent[i].insert_run(r.first, r.count as u64);
        }
        let pages = self.encode(i, runs, comp, frame, raw)?;
        w.write_all(frame)?;
        w.flush()?;
        served.pages += pages;
        served.bytes += frame.len() as u64;
        Ok(())
    }

    /// The frames that carry the pages of `runs` in missing region `i`,
    /// read from the stopped process, into `frame`: zero pages as Zero,
    /// the rest as one Pages frame. Returns the page count.
    fn encode(
        &self,
        i: usize,
        runs: &[Run],
        comp: &mut Compressor,
        frame: &mut Vec<u8>,
        raw: &mut Vec<u8>,
    ) -> std::io::Result<u64> {
        frame.clear();
        if runs.is_empty() {
            return Ok(0);
        }
        let ps = self.page_size as usize;
        let m = &self.missing[i];
        let pages: u64 = runs.iter().map(|r| r.count as u64).sum();
        raw.resize(pages as usize * ps, 0);
        self.mem
            .read_runs(m.start, self.page_size, runs, raw)
            .map_err(std::io::Error::other)?;
        let mut zero = Vec::new();
        let mut data_runs = Vec::new();
        let mut data = Vec::new();
        let mut off = 0;
        for r in runs {
            for p in r.first..r.first + r.count as u64 {
                let page = &raw[off..off + ps];
                if page.iter().all(|&b| b == 0) {
                    crate::pages::push_run(&mut zero, p, 1);
                } else {
                    crate::pages::push_run(&mut data_runs, p, 1);
                    data.extend_from_slice(page);
                }
                off += ps;
            }
        }
        if !zero.is_empty() {
            Control::Zero {
                round: POSTCOPY_ROUND,
                region: m.index,
                runs: zero,
            }
            .encode(frame);
        }
        if !data_runs.is_empty() {
            protocol::encode_pages(
                frame,
                POSTCOPY_ROUND,
                m.index,
                &data_runs,
                &data,
                |input, out| comp.compress(input, out),
            );
        }
        Ok(pages)
    }
}

fn in_runs(runs: &[Run], p: u64) -> bool {
    let i = runs.partition_point(|r| r.first + r.count as u64 <= p);
    runs.get(i).is_some_and(|r| r.first <= p)
}

/// A thread reading the destination's frames: page requests, and the final
/// answer.
fn spawn_reader(mut reader: Reader) -> Receiver<Msg> {
    // Silence is fine here (a destination with no faults asks nothing);
    // a dead link fails the writes (TCP_USER_TIMEOUT) and the final wait
    // has its deadline.
    reader.set_deadline(None);
    let _ = reader.set_timeout(None);
    let (tx, rx) = crossbeam_channel::unbounded();
    let _ = std::thread::Builder::new()
        .name("postcopy-requests".into())
        .spawn(move || {
            let mut r = BufReader::new(reader);
            loop {
                let msg = match protocol::read_control(&mut r) {
                    Ok(Control::PageRequest { addr, pages }) => Msg::Request(addr, pages),
                    Ok(c) => Msg::Answer(c),
                    Err(e) => Msg::Broken(e.to_string()),
                };
                let end = !matches!(msg, Msg::Request(..));
                if tx.send(msg).is_err() || end {
                    return;
                }
            }
        });
    rx
}

/// The background cursor just after page `page` of missing region `i`
/// (whose missing pages are `runs`): at the first missing page from
/// there on.
fn after(runs: &[Run], i: usize, page: u64) -> (usize, usize, u64) {
    match runs.iter().position(|r| r.first + r.count as u64 > page) {
        Some(k) => (i, k, page.saturating_sub(runs[k].first)),
        None => (i, runs.len(), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_in_runs() {
        let runs = [
            Run { first: 2, count: 3 },
            Run {
                first: 10,
                count: 1,
            },
        ];
        let inside: Vec<u64> = (0..12).filter(|&p| in_runs(&runs, p)).collect();
        assert_eq!(inside, vec![2, 3, 4, 10]);
    }

    #[test]
    fn the_background_goes_on_after_the_faulted_pages() {
        let runs = [
            Run { first: 2, count: 3 },
            Run {
                first: 10,
                count: 4,
            },
        ];
        assert_eq!(after(&runs, 1, 0), (1, 0, 0));
        assert_eq!(after(&runs, 1, 3), (1, 0, 1));
        assert_eq!(after(&runs, 1, 5), (1, 1, 0));
        assert_eq!(after(&runs, 1, 12), (1, 1, 2));
        assert_eq!(after(&runs, 1, 14), (1, 2, 0));
    }
}
